//! The MoE runtime: loads Hugging Face checkpoints (safetensors, memory-mapped) into a
//! Burn model whose experts stay addressable one by one, runs prefill and decode with a
//! KV cache, and reports every MoE layer's routing to an observer. On top of it: the
//! expert cache and its trace-driven simulator, and the offloading engine ([`engine`])
//! that reads experts from disk into a bounded cache with learned prefetch and
//! cache-aware routing.

pub mod cache;
pub mod checkpoint;
pub use predictor::device;
pub mod engine;
pub mod error;
pub mod gate;
pub mod generate;
pub mod layers;
pub mod models;
pub mod moe;
pub mod planner;
pub mod prefetch;
pub mod rope;
pub mod routing;
pub mod simulate;
pub mod synth_checkpoint;
pub mod tinymoe;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use error::{ModelError, Result};
pub use models::{ModelShape, MoeModel};
pub use routing::{RouteDecision, RouterScoring, RoutingObserver};
