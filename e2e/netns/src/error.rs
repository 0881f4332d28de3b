use std::io;

/// Everything that can go wrong while building or using a test topology.
///
/// Errors carry the command and its stderr, because a failing `ip` call in a
/// test is only debuggable with the exact command line that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },

    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("could not enter network namespace {namespace}: {source}")]
    Enter {
        namespace: String,
        #[source]
        source: io::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    #[error("a thread inside namespace {namespace} panicked")]
    ThreadPanicked { namespace: String },
}

impl NetnsError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        NetnsError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = NetnsError> = std::result::Result<T, E>;
