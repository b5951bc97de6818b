//! Errors of the runtime. Each names the file and, for weights, the tensor.

use std::path::{Path, PathBuf};

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// What went wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is malformed or unusable.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// A weight the architecture needs is absent.
    #[error("{}: missing tensor {name}", dir.display())]
    MissingTensor { dir: PathBuf, name: String },
    /// A weight has the wrong shape for the config.
    #[error("{}: tensor {name} has shape {found:?}, expected {expected:?} from config.json", file.display())]
    Shape {
        file: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// Bad input to a running model (token id out of range, empty prompt).
    #[error("{0}")]
    Input(String),
    /// Running one prompt (or one recorded sequence) failed.
    #[error("prompt '{name}': {source}")]
    Prompt {
        name: String,
        #[source]
        source: Box<ModelError>,
    },
    /// Something driving the model through its observer hooks failed (an expert
    /// cache reading weights, a predictor forecasting); its error, unchanged.
    #[error(transparent)]
    Observer(Box<dyn std::error::Error + Send + Sync>),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// `source`, raised while running the prompt (or sequence) `name`.
    pub fn in_prompt(name: impl Into<String>, source: ModelError) -> Self {
        ModelError::Prompt {
            name: name.into(),
            source: Box::new(source),
        }
    }

    /// Wraps the error of an observer (see [`ModelError::Observer`]).
    pub fn observer(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        ModelError::Observer(Box::new(e))
    }

    pub fn file(path: &Path, msg: impl Into<String>) -> Self {
        ModelError::File {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}
