//! What can go wrong starting or driving the control plane.

use std::path::PathBuf;

/// The control plane's one error type.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The binaries are not built and could not be built.
    #[error("the control plane binaries: {0}")]
    Binaries(String),
    /// Generating certificates or keys failed.
    #[error("generating certificates: {0}")]
    Pki(#[from] rcgen::Error),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A component did not become healthy in time; its log tail is included.
    #[error("{component} did not become ready within {seconds} s (log {log}):\n{tail}")]
    NotReady {
        component: &'static str,
        seconds: u64,
        log: PathBuf,
        tail: String,
    },
    /// A component exited while it should be running.
    #[error("{component} exited ({status}) (log {log}):\n{tail}")]
    Exited {
        component: &'static str,
        status: String,
        log: PathBuf,
        tail: String,
    },
    /// A Kubernetes API call failed.
    #[error("kube-apiserver: {0}")]
    Kube(#[from] kube::Error),
    /// A kubeconfig could not be read back.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// etcd's HTTP gateway answered unexpectedly.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The control plane's runtime thread is gone.
    #[error("the control plane runtime stopped")]
    RuntimeGone,
    /// The configuration cannot work.
    #[error("invalid control plane configuration: {0}")]
    Invalid(String),
}

impl ControlPlaneError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ControlPlaneError::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = ControlPlaneError> = std::result::Result<T, E>;
