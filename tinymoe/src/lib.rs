//! Training a tiny Qwen3-MoE language model from text, on Burn's autodiff CPU backend,
//! and exporting it as a Hugging Face checkpoint that [`inference::MoeModel`] loads.
//!
//! - [`data`]: corpus reading (text paragraphs, `.jsonl` string fields), the seeded
//!   document-level validation split, byte-level BPE training, token streams, batches.
//! - [`model`]: the trainable model, computing exactly what
//!   [`inference::models::llama_moe`] computes for `qwen3_moe` at inference.
//! - [`train`]: AdamW with warmup + cosine decay, load-balancing loss, global gradient
//!   clipping, validation, progress bar, resumable checkpoints in `OUT/train-state/`.
//! - [`export`]: `config.json`, `model.safetensors` (bf16), `tokenizer.json` and
//!   `training.json`, written atomically.

pub mod data;
pub mod error;
pub mod export;
pub mod model;
pub mod state;
pub mod synth;
pub mod train;

use serde::{Deserialize, Serialize};

use crate::error::Result;

pub use error::TinyMoeError;
pub use model::TinyMoe;
pub use train::{train, TrainOptions, TrainSummary};

/// The shape of a tiny Qwen3-MoE model. Every field is written to `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinyMoeConfig {
    /// Embedding rows (at least the tokenizer's vocabulary).
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Decoder layers, every one a sparse MoE layer.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key / value heads (grouped-query attention); divides `num_heads`.
    pub num_kv_heads: usize,
    /// Width of one head (even, for RoPE).
    pub head_dim: usize,
    /// Routed experts per layer.
    pub num_experts: usize,
    /// Experts chosen per token.
    pub top_k: usize,
    /// Hidden width of one SwiGLU expert.
    pub moe_intermediate_size: usize,
    /// Training context length (and `max_position_embeddings`).
    pub context: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Share the embedding matrix with the output projection (no `lm_head.weight`).
    pub tie_embeddings: bool,
}

impl Default for TinyMoeConfig {
    fn default() -> Self {
        TinyMoeConfig {
            vocab_size: 4096,
            hidden_size: 128,
            num_layers: 6,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 32,
            num_experts: 16,
            top_k: 2,
            moe_intermediate_size: 128,
            context: 128,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            tie_embeddings: false,
        }
    }
}

impl TinyMoeConfig {
    /// Checks that the shape is usable; the error says which setting is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TinyMoeError::input(m));
        let positive = [
            ("vocab size", self.vocab_size),
            ("hidden size", self.hidden_size),
            ("layers", self.num_layers),
            ("heads", self.num_heads),
            ("kv heads", self.num_kv_heads),
            ("head dim", self.head_dim),
            ("experts", self.num_experts),
            ("top-k", self.top_k),
            ("expert width", self.moe_intermediate_size),
            ("context", self.context),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be positive"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "heads ({}) must be a multiple of kv heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dim {} must be even (RoPE)", self.head_dim));
        }
        if self.top_k > self.num_experts {
            return bad(format!(
                "top-k ({}) exceeds the number of experts ({})",
                self.top_k, self.num_experts
            ));
        }
        if self.vocab_size < data::MIN_VOCAB {
            return bad(format!(
                "vocab size {} is below {} (256 bytes + special tokens)",
                self.vocab_size,
                data::MIN_VOCAB
            ));
        }
        if !(self.rope_theta > 0.0 && self.rms_norm_eps > 0.0) {
            return bad("rope theta and RMSNorm epsilon must be positive".into());
        }
        Ok(())
    }

    /// Trainable parameters (the tied embedding counted once).
    pub fn n_params(&self) -> usize {
        let (h, hd) = (self.hidden_size, self.head_dim);
        let attn = h * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * hd;
        let moe = self.num_experts * (h + 3 * h * self.moe_intermediate_size);
        let layer = attn + moe + 2 * h;
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * layer + h + head
    }

    /// Size of `model.safetensors` in bf16, header excluded.
    pub fn bf16_bytes(&self) -> usize {
        2 * self.n_params()
    }
}
