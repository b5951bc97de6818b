//! Errors of the predictor library; file errors name the file.

use std::path::{Path, PathBuf};

/// Result alias for this crate.
pub type Result<T, E = PredictorError> = std::result::Result<T, E>;

/// What went wrong while training, loading or evaluating a predictor.
#[derive(Debug, thiserror::Error)]
pub enum PredictorError {
    /// Reading a trace failed.
    #[error(transparent)]
    Trace(#[from] datasets::TraceError),
    /// The operating system refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint file is missing, malformed or does not fit.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// Options or inputs that cannot work together.
    #[error("{0}")]
    Invalid(String),
}

impl PredictorError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        PredictorError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A problem with the file at `path`.
    pub fn file(path: &Path, msg: impl Into<String>) -> Self {
        PredictorError::File {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}
