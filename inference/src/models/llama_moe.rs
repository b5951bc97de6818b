//! Llama-style decoders with sparse MoE feed-forwards: Mixtral, Qwen2-MoE, Qwen3-MoE
//! and OLMoE. Per layer:
//!
//! ```text
//! h = x + o_proj(attn(rope(norm_q(q_proj(n))), rope(norm_k(k_proj(n))), v_proj(n)))   n = rms_norm(x)
//! y = h + ffn(rms_norm(h))        ffn = sparse MoE (router softmax, top-k) or dense SwiGLU
//! ```
//!
//! Differences, all read from `config.json`: Mixtral names its MoE tensors
//! `block_sparse_moe.*` with `w1/w3/w2` experts and always renormalises the top-k
//! weights; Qwen2-MoE adds a shared expert scaled by `sigmoid(shared_expert_gate(x))`
//! and has q/k/v biases; Qwen3-MoE normalises q and k per head (`q_norm`, `k_norm` of
//! size head_dim) and may keep some layers dense (`mlp_only_layers`,
//! `decoder_sparse_step`); OLMoE normalises q and k over the whole projection and may
//! clip q/k/v (`clip_qkv`). Mixtral attends over `sliding_window` when it is set, Qwen
//! with `use_sliding_window` (Qwen2-MoE on the layers of `layer_types`).

use burn::tensor::{Device, Tensor};
use serde::Deserialize;

use crate::attention::{
    self, AttentionInputs, AttentionOptions, AttentionShape, GroupedQueryAttention, QkNormKind,
};
use crate::checkpoint::Checkpoint;
use crate::decoder::{DecoderStack, StackConfig};
use crate::error::{ModelError, Result};
use crate::layers::{Dense, KvCache, SwiGlu};
use crate::moe::{FeedForward, SharedExpert, SparseMoe};
use crate::rope::{RopeParameters, RotaryEmbedding};
use crate::routing::{RouterScoring, RoutingObserver};

/// Which member of the family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
}

/// The `config.json` fields this family reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    #[serde(default)]
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Absent: transformers' default for the member ([`Config::rms_norm_eps`]).
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    rope_theta: Option<f64>,
    /// transformers 5 spelling: theta, type and scaling together.
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    /// Older spelling of the scaling (`rope_theta` beside it).
    #[serde(default)]
    rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Mixtral's expert count.
    #[serde(default)]
    num_local_experts: Option<usize>,
    /// Qwen / OLMoE expert count.
    #[serde(default)]
    num_experts: Option<usize>,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default)]
    shared_expert_intermediate_size: Option<usize>,
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    #[serde(default)]
    pub decoder_sparse_step: Option<usize>,
    #[serde(default)]
    pub clip_qkv: Option<f64>,
    /// Mixtral's attention window (every layer), or Qwen's with `use_sliding_window`:
    /// absent (`None`) and `null` (`Some(None)`) differ for Qwen.
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Option<usize>>,
    #[serde(default)]
    use_sliding_window: bool,
    /// Qwen2-MoE: which layers slide (`sliding_attention` / `full_attention`), by default
    /// the even layers below `max_window_layers`.
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default = "default_max_window_layers")]
    max_window_layers: usize,
}

fn default_max_window_layers() -> usize {
    28
}

/// A field that is present, `null` or not: `Some(value)`; absent, `#[serde(default)]`
/// gives `None`.
fn present<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

impl Config {
    pub fn variant(&self) -> Option<Variant> {
        match self.model_type.as_str() {
            "mixtral" => Some(Variant::Mixtral),
            "qwen2_moe" => Some(Variant::Qwen2Moe),
            "qwen3_moe" => Some(Variant::Qwen3Moe),
            "olmoe" => Some(Variant::Olmoe),
            _ => None,
        }
    }

    pub fn n_experts(&self) -> usize {
        self.num_local_experts.or(self.num_experts).unwrap_or(0)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// `rms_norm_eps`, or transformers' default (Mixtral and OLMoE 1e-5, Qwen 1e-6).
    pub fn rms_norm_eps(&self) -> f64 {
        self.rms_norm_eps.unwrap_or(match self.variant() {
            Some(Variant::Mixtral | Variant::Olmoe) => 1e-5,
            _ => 1e-6,
        })
    }

    /// `max_position_embeddings`, or transformers' default (Mixtral 131072, Qwen 32768,
    /// OLMoE 4096).
    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
            .unwrap_or(match self.variant() {
                Some(Variant::Mixtral) => 131_072,
                Some(Variant::Olmoe) => 4096,
                _ => 32_768,
            })
    }

    /// The shared expert's width (Qwen2-MoE; transformers' default 5632 when absent).
    pub fn shared_expert_size(&self) -> Option<usize> {
        match self.variant() {
            Some(Variant::Qwen2Moe) => Some(self.shared_expert_intermediate_size.unwrap_or(5632)),
            _ => None,
        }
        .filter(|&s| s > 0)
    }

    /// The rotary embedding `rope_parameters` / `rope_scaling` describe (every type
    /// transformers gives these architectures but `longrope`, refused by name); without a
    /// `rope_theta`, transformers' default (Mixtral 1e6, the others 1e4).
    pub fn rope(&self) -> std::result::Result<RotaryEmbedding, String> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let default_theta = match self.variant() {
            Some(Variant::Mixtral) => 1e6,
            _ => 10_000.0,
        };
        RotaryEmbedding::from_config(
            params,
            self.rope_theta,
            default_theta,
            self.head_dim(),
            self.max_position_embeddings(),
        )
    }

    /// Whether model layer `l` has a sparse MoE block (else a dense SwiGLU).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        let step = self.decoder_sparse_step.unwrap_or(1).max(1);
        self.n_experts() > 0 && !self.mlp_only_layers.contains(&l) && (l + 1).is_multiple_of(step)
    }

    /// The attention window and, per layer, whether it attends over it, as transformers
    /// reads them: Mixtral's `sliding_window` on every layer; with `use_sliding_window`,
    /// Qwen3-MoE's on every layer (an explicit `null`: none) and Qwen2-MoE's on the layers
    /// `layer_types` marks `sliding_attention` (by default the even layers below
    /// `max_window_layers`); an absent `sliding_window` is Qwen's default, 4096. OLMoE
    /// never slides.
    pub fn sliding_layers(
        &self,
        v: Variant,
    ) -> std::result::Result<(Option<usize>, Vec<bool>), String> {
        let n = self.num_hidden_layers;
        let qwen_window = self.sliding_window.unwrap_or(Some(4096));
        let (window, types) = match v {
            Variant::Mixtral => (self.sliding_window.flatten(), None),
            Variant::Qwen3Moe if self.use_sliding_window => (qwen_window, None),
            Variant::Qwen2Moe => (
                qwen_window.filter(|_| self.use_sliding_window),
                self.layer_types.as_deref(),
            ),
            _ => (None, None),
        };
        let sliding = attention::sliding_layers(window, types, n, |l| {
            window.is_some()
                && (v != Variant::Qwen2Moe || (l % 2 == 0 && l < self.max_window_layers))
        })?;
        Ok((window, sliding))
    }

    fn norm_topk(&self, v: Variant) -> bool {
        match v {
            Variant::Mixtral => true,
            _ => self.norm_topk_prob.unwrap_or(false),
        }
    }
}

/// A loaded model of this family.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: Config,
    pub variant: Variant,
    pub(super) stack: DecoderStack<GroupedQueryAttention>,
    rope: RotaryEmbedding,
    /// The window of the layers that slide (`None`: none does).
    window: Option<usize>,
}

impl Model {
    /// Loads the weights of `ck` (whose config is `config`) onto `device`.
    pub fn load(ck: &Checkpoint, config: Config, device: &Device) -> Result<Model> {
        let variant = config.variant().ok_or_else(|| {
            ModelError::file(
                &ck.config_path(),
                format!(
                    "model_type {} is not in the Llama-MoE family",
                    config.model_type
                ),
            )
        })?;
        let c = &config;
        let rope = c.rope().map_err(|e| {
            ModelError::file(
                &ck.config_path(),
                format!("rope_parameters / rope_scaling: {e}"),
            )
        })?;
        let (window, sliding) = c
            .sliding_layers(variant)
            .map_err(|e| ModelError::file(&ck.config_path(), e))?;
        let (h, eps) = (c.hidden_size, c.rms_norm_eps());
        let stack = StackConfig {
            vocab_size: c.vocab_size,
            hidden_size: h,
            num_hidden_layers: c.num_hidden_layers,
            rms_norm_eps: eps,
            tie_word_embeddings: c.tie_word_embeddings,
        };
        let shape = AttentionShape {
            hidden: h,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
        };
        let options = AttentionOptions {
            qk_norm: match variant {
                Variant::Qwen3Moe => QkNormKind::PerHead,
                Variant::Olmoe => QkNormKind::Full,
                _ => QkNormKind::None,
            },
            rms_norm_eps: eps,
            clip_qkv: c.clip_qkv.filter(|_| variant == Variant::Olmoe),
            sinks: false,
            sliding: false,
        };
        let stack = DecoderStack::load(ck, stack, device, |l, p| {
            let options = AttentionOptions {
                sliding: sliding[l],
                ..options
            };
            let attention =
                GroupedQueryAttention::load(ck, &format!("{p}.self_attn"), shape, options, device)?;
            let ffn = if c.is_moe_layer(l) {
                FeedForward::Sparse(Box::new(load_moe(ck, c, variant, l, device)?))
            } else {
                let m = format!("{p}.mlp");
                FeedForward::Dense(Box::new(SwiGlu::load(
                    ck,
                    [
                        &format!("{m}.gate_proj"),
                        &format!("{m}.up_proj"),
                        &format!("{m}.down_proj"),
                    ],
                    h,
                    c.intermediate_size,
                    device,
                )?))
            };
            Ok((attention, ffn))
        })?;
        Ok(Model {
            rope,
            variant,
            stack,
            window,
            config,
        })
    }

    /// Runs `tokens` after the positions already in `cache`; returns logits `[T, vocab]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        observer: &mut dyn RoutingObserver,
    ) -> Result<Tensor<2>> {
        let past = cache.len();
        let head_dim = self.config.head_dim();
        let device = self.stack.device();
        let inputs = AttentionInputs::new(
            &self.rope,
            past,
            tokens.len(),
            head_dim,
            self.window,
            &device,
        );
        self.stack
            .forward(tokens, past, observer, |l, attention, n| {
                attention.forward(l, n, &inputs, cache)
            })
    }
}

fn load_moe(
    ck: &Checkpoint,
    c: &Config,
    variant: Variant,
    l: usize,
    device: &Device,
) -> Result<SparseMoe> {
    let h = c.hidden_size;
    let e = c.n_experts();
    let (block, names): (String, [&str; 3]) = match variant {
        Variant::Mixtral => (
            format!("model.layers.{l}.block_sparse_moe"),
            ["w1", "w3", "w2"],
        ),
        _ => (
            format!("model.layers.{l}.mlp"),
            ["gate_proj", "up_proj", "down_proj"],
        ),
    };
    let inter = match variant {
        Variant::Mixtral | Variant::Olmoe => c.intermediate_size,
        _ => c.moe_intermediate_size.unwrap_or(c.intermediate_size),
    };
    let expert_tensors: Vec<[String; 3]> = (0..e)
        .map(|i| names.map(|n| format!("{block}.experts.{i}.{n}")))
        .collect();
    let experts = expert_tensors
        .iter()
        .filter(|_| ck.loads_routed_experts())
        .map(|[g, u, d]| SwiGlu::load(ck, [g, u, d], h, inter, device))
        .collect::<Result<Vec<_>>>()?;
    let shared = match (variant, c.shared_expert_size()) {
        (Variant::Qwen2Moe, Some(si)) => {
            let p = format!("{block}.shared_expert");
            Some(SharedExpert {
                mlp: SwiGlu::load(
                    ck,
                    [
                        &format!("{p}.gate_proj"),
                        &format!("{p}.up_proj"),
                        &format!("{p}.down_proj"),
                    ],
                    h,
                    si,
                    device,
                )?,
                gate: Some(Dense::load(
                    ck,
                    &format!("{block}.shared_expert_gate"),
                    1,
                    h,
                    device,
                )?),
            })
        }
        _ => None,
    };
    Ok(SparseMoe {
        layer: l,
        router: Dense::load(ck, &format!("{block}.gate"), e, h, device)?,
        scoring: RouterScoring::softmax_topk(c.norm_topk(variant)),
        top_k: c.num_experts_per_tok,
        experts,
        expert_tensors,
        shared,
    })
}
