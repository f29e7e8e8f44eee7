//! The errors of a migration. [`Bad`] is what every reader of the input returns: a key
//! path of the input file and what was wrong there. [`MigrateError`] is what `flotilla
//! migrate` reports: a `Bad` with the file it is in, or a file that could not be read or
//! written. A leaf: every other module of `migrate` may use it.

use std::path::PathBuf;

/// A problem in the input, at a key path of the input file (`runners[0].machine.IdleCount`).
/// The message names what was expected, never a value that might be secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bad {
    pub key: String,
    pub message: String,
}

impl Bad {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Why `flotilla migrate` failed: input it refuses (`Parse`, `Input`, `Runners`) or files
/// it cannot or will not read or write.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not valid TOML: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: key `{key}`: {message}")]
    Input {
        file: String,
        key: String,
        message: String,
    },
    #[error("{file}: {message}")]
    Runners { file: String, message: String },
    #[error("{} already exists: use --force to overwrite it", path.display())]
    Exists { path: PathBuf },
    #[error("{} is the input file: choose another --out-dir", path.display())]
    WouldOverwriteInput { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl MigrateError {
    /// 2 for input the conversion refuses (and outputs it will not overwrite), 1 when the
    /// outputs could not be written.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Write { .. } => 1,
            _ => 2,
        }
    }
}
