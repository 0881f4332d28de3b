//! Errors that stop `planproxy-controller run`.

/// Why the controller could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Flags contradict each other.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The log filter does not parse.
    #[error("invalid log filter {filter:?}: {message}")]
    LogFilter {
        /// The rejected filter.
        filter: String,
        /// Why.
        message: String,
    },
    /// No kubeconfig or in-cluster configuration was usable.
    #[error("cannot configure the Kubernetes client: {0}")]
    ClientConfig(#[source] kube::Error),
    /// The admin server could not bind its address.
    #[error("cannot bind the admin server to {address}: {source}")]
    AdminBind {
        /// The address.
        address: std::net::SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// Installing the signal handlers failed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}
