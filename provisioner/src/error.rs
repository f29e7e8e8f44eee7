//! The library's error type: AWS and GitLab failures keep their own types; the rest are
//! situations `apply` refuses to resolve by itself, each with a message that says what
//! was found and what to do.

use crate::aws::AwsError;
use crate::gitlab::GitlabError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error(transparent)]
    Gitlab(#[from] GitlabError),
    /// A resource with the stack's name exists but is not the stack's.
    #[error("{0}")]
    NotOurs(String),
    /// A property that cannot change in place differs from the stack file.
    #[error("{0}")]
    Immutable(String),
    #[error("timed out after {secs}s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("{0}")]
    Refused(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An SDK builder's result: they refuse only a missing required field, which would be
/// a bug here, reported rather than panicking.
pub(crate) fn built<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T> {
    r.map_err(|e| Error::Refused(format!("building the {what}: {e}")))
}
