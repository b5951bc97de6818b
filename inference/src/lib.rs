//! The MoE runtime: loads Hugging Face checkpoints (safetensors, memory-mapped) into a
//! Burn model whose experts stay addressable one by one, runs prefill and decode with a
//! KV cache, and reports every MoE layer's routing to an observer.

pub mod cache;
pub mod checkpoint;
pub use predictor::device;
pub mod error;
pub mod generate;
pub mod layers;
pub mod models;
pub mod moe;
pub mod prefetch;
pub mod rope;
pub mod routing;
pub mod simulate;
pub mod tinymoe;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use error::{ModelError, Result};
pub use models::{ModelShape, MoeModel};
pub use routing::{RouteDecision, RouterScoring, RoutingObserver};
