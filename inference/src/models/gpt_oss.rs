//! GPT-OSS. Per layer:
//!
//! ```text
//! h = x + o_proj(attn_sinks(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))   n = rms_norm(x)
//! y = h + moe(rms_norm(h))
//! ```
//!
//! q/k/v/o have biases; every head has a learned sink logit (`self_attn.sinks`) that
//! joins the softmax and is dropped; layers alternate sliding-window and full attention
//! (`layer_types`, `sliding_window`: keys with `q - k < window`). RoPE is YaRN (rotate
//! half, cos / sin carry the attention factor). The router is `mlp.router` (weight and
//! bias): top-k logits, softmax over those k. Experts are stored fused,
//! `mlp.experts.gate_up_proj [E, H, 2I]` (gate = even columns, up = odd) with
//! `gate_up_proj_bias [E, 2I]`, and `down_proj [E, I, H]` with `down_proj_bias [E, H]`,
//! all applied as `x @ W + b`; each expert is cut out of them at load time
//! ([`load_expert`]) into its own [`SwiGlu`] with the clamped activation
//! `(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)`, `g = min(gate, limit)`.

use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;

use crate::attention::{
    self, AttentionInputs, AttentionOptions, AttentionShape, GroupedQueryAttention, QkNormKind,
};
use crate::checkpoint::Checkpoint;
use crate::decoder::{DecoderStack, StackConfig};
use crate::error::{ModelError, Result};
use crate::layers::{Dense, GluActivation, KvCache, SwiGlu};
use crate::moe::{FeedForward, SparseMoe};
use crate::rope::{RopeParameters, RotaryEmbedding};
use crate::routing::{RouterScoring, RoutingObserver};

/// The `config.json` fields GPT-OSS reads (defaults as in transformers).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    /// Absent: transformers' default, 128 (an explicit `null`: no window, refused where a
    /// layer slides).
    #[serde(default = "default_sliding_window")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    rope_scaling: Option<RopeParameters>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_alpha")]
    pub swiglu_alpha: f64,
    #[serde(default = "default_limit")]
    pub swiglu_limit: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_eps() -> f64 {
    1e-5
}

fn default_max_pos() -> usize {
    131_072
}

fn default_sliding_window() -> Option<usize> {
    Some(128)
}

fn default_alpha() -> f64 {
    1.702
}

fn default_limit() -> f64 {
    7.0
}

impl Config {
    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Per layer, whether it attends over `sliding_window`: as `layer_types` marks it,
    /// else the even layers (transformers' default).
    pub fn sliding_layers(&self) -> std::result::Result<Vec<bool>, String> {
        attention::sliding_layers(
            self.sliding_window,
            self.layer_types.as_deref(),
            self.num_hidden_layers,
            |l| l.is_multiple_of(2),
        )
    }

    fn rope(&self) -> std::result::Result<RotaryEmbedding, String> {
        let published = RopeParameters {
            rope_type: Some("yarn".into()),
            factor: Some(32.0),
            beta_fast: Some(32.0),
            beta_slow: Some(1.0),
            truncate: Some(false),
            original_max_position_embeddings: Some(4096.0),
            ..Default::default()
        };
        let params = self
            .rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .unwrap_or(&published);
        RotaryEmbedding::from_config(
            Some(params),
            self.rope_theta,
            150_000.0,
            self.head_dim(),
            self.max_position_embeddings,
        )
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let (nh, nkv) = (self.num_attention_heads, self.kv_heads());
        if nh == 0 || nkv == 0 || !nh.is_multiple_of(nkv) {
            return Err(format!(
                "num_attention_heads {nh} must be a positive multiple of num_key_value_heads {nkv}"
            ));
        }
        let (k, e) = (self.num_experts_per_tok, self.num_local_experts);
        if k == 0 || k > e {
            return Err(format!("num_experts_per_tok {k} must be in 1..={e}"));
        }
        Ok(())
    }
}

/// A loaded GPT-OSS model.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: Config,
    pub(super) stack: DecoderStack<GroupedQueryAttention>,
    rope: RotaryEmbedding,
}

fn tensor2(v: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(v, shape), device)
}

fn tensor1(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::<1>::from_data(TensorData::new(v, [n]), device)
}

/// Cuts expert `e` of layer `l` out of the fused expert tensors, reading only its own
/// slabs, into a [`SwiGlu`] with GPT-OSS's clamped activation.
pub fn load_expert(
    ck: &Checkpoint,
    c: &Config,
    l: usize,
    e: usize,
    device: &Device,
) -> Result<SwiGlu> {
    let (h, i, n) = (c.hidden_size, c.intermediate_size, c.num_local_experts);
    let p = format!("model.layers.{l}.mlp.experts");
    let gate_up = ck.tensor_f32_slab(&format!("{p}.gate_up_proj"), &[n, h, 2 * i], e)?;
    let gate_up_b = ck.tensor_f32_slab(&format!("{p}.gate_up_proj_bias"), &[n, 2 * i], e)?;
    let down = ck.tensor_f32_slab(&format!("{p}.down_proj"), &[n, i, h], e)?;
    let down_b = ck.tensor_f32_slab(&format!("{p}.down_proj_bias"), &[n, h], e)?;
    // columns 2j / 2j+1 of each row are gate / up unit j
    let pick = |v: &[f32], parity: usize| -> Vec<f32> {
        v.iter().skip(parity).step_by(2).copied().collect()
    };
    let dense = |w: Vec<f32>, shape: [usize; 2], b: Vec<f32>| Dense {
        weight: tensor2(w, shape, device),
        bias: Some(tensor1(b, device)),
    };
    Ok(SwiGlu {
        gate: dense(pick(&gate_up, 0), [h, i], pick(&gate_up_b, 0)),
        up: dense(pick(&gate_up, 1), [h, i], pick(&gate_up_b, 1)),
        down: dense(down, [i, h], down_b),
        act: GluActivation::ClampedSwish {
            alpha: c.swiglu_alpha,
            limit: c.swiglu_limit,
        },
    })
}

impl Model {
    /// Loads the weights of `ck` (whose config is `config`) onto `device`.
    pub fn load(ck: &Checkpoint, config: Config, device: &Device) -> Result<Model> {
        let bad = |msg: String| ModelError::file(&ck.config_path(), msg);
        if config.model_type != "gpt_oss" {
            return Err(bad(format!(
                "model_type {} is not gpt_oss",
                config.model_type
            )));
        }
        config.validate().map_err(bad)?;
        let rope = config.rope().map_err(bad)?;
        let sliding = config.sliding_layers().map_err(bad)?;
        let c = &config;
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let shape = AttentionShape {
            hidden: h,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
        };
        let e = c.num_local_experts;
        let stack = StackConfig {
            vocab_size: c.vocab_size,
            hidden_size: h,
            num_hidden_layers: c.num_hidden_layers,
            rms_norm_eps: eps,
            tie_word_embeddings: c.tie_word_embeddings,
        };
        let stack = DecoderStack::load(ck, stack, device, |l, p| {
            let attn = format!("{p}.self_attn");
            let experts = (0..e)
                .map(|i| load_expert(ck, c, l, i, device))
                .collect::<Result<Vec<_>>>()?;
            let moe = SparseMoe {
                layer: l,
                router: Dense::load(ck, &format!("{p}.mlp.router"), e, h, device)?,
                scoring: RouterScoring::gpt_oss(),
                top_k: c.num_experts_per_tok,
                experts,
                expert_tensors: Vec::new(),
                shared: None,
            };
            let options = AttentionOptions {
                qk_norm: QkNormKind::None,
                rms_norm_eps: eps,
                clip_qkv: None,
                sinks: true,
                sliding: sliding[l],
            };
            let attention = GroupedQueryAttention::load(ck, &attn, shape, options, device)?;
            Ok((attention, FeedForward::Sparse(Box::new(moe))))
        })?;
        Ok(Model {
            rope,
            stack,
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
        let c = &self.config;
        let device = self.stack.device();
        let inputs = AttentionInputs::new(
            &self.rope,
            past,
            tokens.len(),
            c.head_dim(),
            c.sliding_window,
            &device,
        );
        self.stack
            .forward(tokens, past, observer, |l, attention, n| {
                attention.forward(l, n, &inputs, cache)
            })
    }
}
