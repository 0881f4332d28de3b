use std::time::Duration;

/// What can go wrong while running an end-to-end scenario.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    #[error("network namespace setup: {0}")]
    Netns(#[from] planproxy_netns::NetnsError),

    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("kubeconfig: {0}")]
    Kubeconfig(String),

    #[error("{what} did not happen within {timeout:?}; last observation: {last}")]
    Timeout {
        what: String,
        timeout: Duration,
        last: String,
    },

    #[error(
        "binary {name} not found (looked at {looked_at}); build it with `cargo build --bins` first"
    )]
    MissingBinary { name: String, looked_at: String },

    #[error("the control plane: {0}")]
    ApiServer(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Invalid(String),

    #[error("this step needs the namespace cluster; a real cluster cannot {0}")]
    Unsupported(&'static str),
}

impl E2eError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        E2eError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = E2eError> = std::result::Result<T, E>;
