//! Errors of training and exporting: the runtime's (files, tensors, bad input) and the
//! training records' (saving or loading model and optimizer state).

pub use inference::ModelError;

/// Result alias for this crate.
pub type Result<T, E = TinyMoeError> = std::result::Result<T, E>;

/// What went wrong training or exporting a tiny MoE.
#[derive(Debug, thiserror::Error)]
pub enum TinyMoeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Saving or loading a training record failed.
    #[error(transparent)]
    Record(#[from] predictor::PredictorError),
}

impl TinyMoeError {
    /// Bad input (a setting, a corpus, a tokenizer).
    pub fn input(msg: String) -> Self {
        ModelError::Input(msg).into()
    }

    /// A file is malformed or unusable.
    pub fn file(path: &std::path::Path, msg: impl Into<String>) -> Self {
        ModelError::file(path, msg).into()
    }

    /// Reading or writing `path` failed.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        ModelError::io(path, source).into()
    }
}
