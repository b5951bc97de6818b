//! Learned expert-activation prediction: a small causal transformer (Burn) trained on
//! routing traces to forecast which experts the next token, or the next layers of the
//! current token, will use.
//!
//! - [`config`]: the predictor's shape and task; [`model`]: the network and its loss;
//! - [`train`]: AdamW, early stopping on validation F1, resumable checkpoints; [`step`]:
//!   one data-parallel training step;
//! - [`eval`] and [`metrics`]: precision / recall / F1 and the papers' figures, next to
//!   the [`baselines`];
//! - [`card`]: the self-describing checkpoint directory; [`serve`]: incremental online
//!   prediction for a runtime;
//! - [`blend`]: the online blend, a training-free forecaster of the next layers that
//!   learns its weights while the model decodes.

pub mod baselines;
pub mod batch;
pub mod blend;
pub mod card;
pub mod config;
pub use backend as device;
pub mod error;
pub mod eval;
pub mod fused;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod prior;
pub mod report;
pub mod serve;
pub mod state;
pub mod step;
pub mod token_table;
pub mod train;

pub use card::{LoadedPredictor, PredictorCard, PredictorDir};
pub use config::{Features, PredictorConfig, Query, Task};
pub use error::{PredictorError, Result};
pub use eval::{evaluate, EarlyScores, EvalOptions, EvalReport, GateBaseline};
pub use model::ExpertPredictor;
pub use serve::{ExpertForecast, OnlinePredictor};
pub use train::{train, TrainOptions, TrainSettings, TrainSummary};
