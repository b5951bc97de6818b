//! Errors of the trace library. Every error that comes from a file names it, and the
//! line or record where that makes sense.

use std::path::{Path, PathBuf};

/// Result alias for this crate.
pub type Result<T, E = TraceError> = std::result::Result<T, E>;

/// What went wrong while reading, validating or writing a trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The operating system refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file's content is malformed at a given line (1-based) or record.
    #[error("{}:{line}: {msg}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// A file is malformed as a whole (wrong magic, truncated, missing metadata).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// A trace or its metadata breaks an invariant.
    #[error("invalid trace: {0}")]
    Invalid(String),
    /// Parquet reading or writing failed inside polars.
    #[error("{}: parquet: {source}", path.display())]
    Polars {
        path: PathBuf,
        #[source]
        source: polars::prelude::PolarsError,
    },
    /// Drawing a chart failed.
    #[error("{}: plot: {msg}", path.display())]
    Plot { path: PathBuf, msg: String },
}

impl TraceError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TraceError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A parse error at `line` (1-based) of `path`.
    pub fn parse(path: &Path, line: usize, msg: impl Into<String>) -> Self {
        TraceError::Parse {
            path: path.to_path_buf(),
            line,
            msg: msg.into(),
        }
    }

    /// A whole-file format error.
    pub fn format(path: &Path, msg: impl Into<String>) -> Self {
        TraceError::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}
