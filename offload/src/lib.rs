//! Running MoE models with a bounded expert cache: the cache and its eviction policies
//! ([`cache`]), prefetchers ([`prefetch`], the model's own gates in [`gate`]), the
//! bandwidth-aware prefetch planner ([`planner`]), the trace-driven simulator
//! ([`simulate`]), the offloading engine that reads experts from disk while the runtime
//! generates ([`engine`]), and the driver of `moecast run` ([`run`], [`replay`]).

pub mod cache;
pub mod engine;
pub mod gate;
pub use planner;
pub mod prefetch;
pub mod replay;
pub mod run;
pub mod simulate;

pub use cache::CacheSize;
pub use replay::ReplaySummary;
pub use run::{run_offloaded, OffloadRun, OffloadRunConfig};

/// What went wrong running a model offloaded.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error(transparent)]
    Model(#[from] inference::ModelError),
    #[error(transparent)]
    Predictor(#[from] predictor::PredictorError),
    #[error(transparent)]
    Trace(#[from] datasets::TraceError),
    /// A file given as a run's report is not one.
    #[error("{}: not a `moecast run --json` report: {msg}", path.display())]
    Report {
        path: std::path::PathBuf,
        msg: String,
    },
}
