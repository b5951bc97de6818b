//! [`TraceMeta`]: what a trace is of, and how files spell it (older spellings of
//! channels included).

use serde::{Deserialize, Serialize};

use crate::channel::{validate_channels, Channel, ROUTER_INPUTS};
use crate::error::{Result, TraceError};
use crate::trace::NOT_COMPUTED;

/// What the trace is of: the model, its MoE shape, where the routing came from and the
/// per-(token, layer) vectors it carries besides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "TraceMetaRepr")]
pub struct TraceMeta {
    /// Model name or path as the source gave it.
    pub model: String,
    /// Architecture family (`qwen3_moe`, `mixtral`, `gpt-oss`, ...), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Number of transformer layers of the model (dense and MoE).
    pub n_layers: u32,
    /// Model layer index of each MoE layer, ascending. Routing is stored in this order.
    pub moe_layers: Vec<u32>,
    /// Routed experts per MoE layer.
    pub n_experts: u32,
    /// Experts chosen per token and MoE layer.
    pub top_k: u32,
    /// Always-active shared experts per MoE layer (not part of the routing).
    #[serde(default)]
    pub n_shared_experts: u32,
    /// Engine or format the routing came from (`moecast`, `route_trace_v1`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Tokenizer the token ids refer to, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// True when each top-k list is in rank order (highest router weight first); false
    /// when the source only recorded the set (ids sorted ascending).
    #[serde(default = "default_true")]
    pub ranked: bool,
    /// Bytes of one expert's weights, per MoE layer, when the source reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_bytes: Option<Vec<u64>>,
    /// The per-(token, MoE layer) vectors the trace carries (router inputs, router
    /// logits, ...; see [`crate::channel`]), in storage order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<Channel>,
}

fn default_true() -> bool {
    true
}

/// [`TraceMeta`] as files spell it: today's fields plus the two that described router
/// inputs and logits before channels (`router_input_dim`, `router_logits`), read into
/// channels so older files keep loading.
#[derive(Deserialize)]
struct TraceMetaRepr {
    model: String,
    #[serde(default)]
    architecture: Option<String>,
    n_layers: u32,
    moe_layers: Vec<u32>,
    n_experts: u32,
    top_k: u32,
    #[serde(default)]
    n_shared_experts: u32,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    tokenizer: Option<String>,
    #[serde(default = "default_true")]
    ranked: bool,
    #[serde(default)]
    expert_bytes: Option<Vec<u64>>,
    #[serde(default)]
    channels: Vec<Channel>,
    #[serde(default)]
    router_input_dim: Option<u32>,
    #[serde(default)]
    router_logits: bool,
}

impl From<TraceMetaRepr> for TraceMeta {
    fn from(r: TraceMetaRepr) -> TraceMeta {
        let mut channels = r.channels;
        let legacy = [
            r.router_input_dim.map(Channel::router_inputs),
            r.router_logits.then(|| Channel::router_logits(r.n_experts)),
        ];
        for c in legacy.into_iter().flatten() {
            if !channels.iter().any(|o| o.name == c.name) {
                channels.push(c);
            }
        }
        TraceMeta {
            model: r.model,
            architecture: r.architecture,
            n_layers: r.n_layers,
            moe_layers: r.moe_layers,
            n_experts: r.n_experts,
            top_k: r.top_k,
            n_shared_experts: r.n_shared_experts,
            source: r.source,
            tokenizer: r.tokenizer,
            ranked: r.ranked,
            expert_bytes: r.expert_bytes,
            channels,
        }
    }
}

impl TraceMeta {
    /// Number of MoE layers.
    pub fn n_moe(&self) -> usize {
        self.moe_layers.len()
    }

    /// Expert-id slots per token: `n_moe_layers x top_k`.
    pub fn slots_per_token(&self) -> usize {
        self.moe_layers.len() * self.top_k as usize
    }

    /// Index of channel `name` in [`TraceMeta::channels`].
    pub fn channel_index(&self, name: &str) -> Option<usize> {
        self.channels.iter().position(|c| c.name == name)
    }

    /// Channel `name`, when the trace carries it.
    pub fn channel(&self, name: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.name == name)
    }

    /// Width of the router-input channel, when the trace carries router inputs.
    pub fn router_input_dim(&self) -> Option<u32> {
        self.channel(ROUTER_INPUTS).map(|c| c.width)
    }

    /// Whether `other` describes the same routing shape (layers, MoE layers, E, k).
    pub fn same_shape(&self, other: &TraceMeta) -> bool {
        self.n_layers == other.n_layers
            && self.moe_layers == other.moe_layers
            && self.n_experts == other.n_experts
            && self.top_k == other.top_k
    }

    /// Checks the metadata's own invariants.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TraceError::Invalid(m));
        if self.moe_layers.is_empty() {
            return bad("meta: moe_layers is empty".into());
        }
        if self.n_experts == 0 || self.n_experts >= NOT_COMPUTED as u32 {
            return bad(format!(
                "meta: n_experts = {} (must be 1..{})",
                self.n_experts, NOT_COMPUTED
            ));
        }
        if self.top_k == 0 || self.top_k > self.n_experts {
            return bad(format!(
                "meta: top_k = {} (must be 1..=n_experts = {})",
                self.top_k, self.n_experts
            ));
        }
        if self.moe_layers.windows(2).any(|w| w[0] >= w[1]) {
            return bad("meta: moe_layers must be strictly ascending".into());
        }
        if let Some(&last) = self.moe_layers.last() {
            if last >= self.n_layers {
                return bad(format!(
                    "meta: MoE layer {last} is not below n_layers = {}",
                    self.n_layers
                ));
            }
        }
        if let Some(b) = &self.expert_bytes {
            if b.len() != self.moe_layers.len() {
                return bad(format!(
                    "meta: expert_bytes has {} entries for {} MoE layers",
                    b.len(),
                    self.moe_layers.len()
                ));
            }
        }
        validate_channels(&self.channels, self.n_experts)
            .map_err(|e| TraceError::Invalid(format!("meta: {e}")))
    }
}
