//! The MoE runtime: loads Hugging Face checkpoints (safetensors, memory-mapped) into a
//! Burn model whose experts stay addressable one by one, runs prefill and decode with a
//! KV cache, and reports every MoE layer's routing to an observer. It knows nothing of
//! traces or predictors: the collector records what it reports, and the offloading
//! stack (crate `offload`) drives it with a bounded expert cache.

pub use backend as device;
pub mod attention;
pub mod checkpoint;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod layers;
pub mod models;
pub mod moe;
pub mod prompts;
pub mod rope;
pub mod routing;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use error::{ModelError, Result};
pub use models::{ModelShape, MoeModel};
pub use routing::{RouteDecision, RouterScoring, RoutingObserver};
