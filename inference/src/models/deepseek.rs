//! DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and fine-grained MoE
//! with shared experts. Per layer:
//!
//! ```text
//! q        = q_proj(n)  or  q_b_proj(rms(q_a_proj(n)))                 n = rms_norm(x)
//! c, k_pe  = split(kv_a_proj_with_mqa(n), [kv_lora_rank, qk_rope_head_dim])
//! k_nope,v = split(kv_b_proj(rms(c)), [qk_nope_head_dim, v_head_dim])  per head
//! h = x + o_proj(attn([q_nope, rope(q_pe)], [k_nope, rope(k_pe)], v))  k_pe shared by heads
//! y = h + ffn(rms_norm(h))   ffn = dense SwiGLU for l < first_k_dense_replace, else
//!                            routed experts + shared experts (one SwiGLU, ungated)
//! ```
//!
//! RoPE acts on interleaved pairs (always in V2, per `rope_interleave` in V3); the
//! pairs are de-interleaved before rotating, which leaves every q·k unchanged. The KV
//! cache holds the compressed latent `rms(c)` and the rotated `k_pe`, as transformers'.
//! The softmax scale is `qk_head_dim^-0.5`, times `mscale^2` under YaRN with
//! `mscale_all_dim`. Routing: V2 softmax with optional group-limited greedy, weights
//! scaled by `routed_scaling_factor`; V3 sigmoid + `e_score_correction_bias`, groups
//! scored by their two best, weights renormalised (`norm_topk_prob`) and scaled.

use burn::tensor::{Device, Tensor};
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::decoder::{DecoderStack, StackConfig};
use crate::error::{ModelError, Result};
use crate::layers::{apply_rope, attention, causal_mask, Dense, KvCache, RmsNorm, SwiGlu};
use crate::moe::{FeedForward, SharedExpert, SparseMoe};
use crate::rope::{deinterleave, yarn_mscale, RopeParameters, RotaryEmbedding};
use crate::routing::{RouterScoring, RoutingObserver};

/// Which member of the family, from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    V2,
    V3,
}

/// The `config.json` fields this family reads (defaults as in transformers).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub n_routed_experts: usize,
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default)]
    pub topk_method: Option<String>,
    #[serde(default)]
    pub n_group: Option<usize>,
    #[serde(default)]
    pub topk_group: Option<usize>,
    #[serde(default)]
    pub routed_scaling_factor: Option<f64>,
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_interleave: Option<bool>,
    /// Absent: transformers' default (V2 2048, V3 4096).
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_eps() -> f64 {
    1e-6
}

/// The epsilon of `q_a_layernorm` and `kv_a_layernorm`: transformers builds them with
/// its RMSNorm's default, not `rms_norm_eps`.
const LATENT_NORM_EPS: f64 = 1e-6;

impl Config {
    /// The family member named by `model_type`.
    pub fn variant(&self) -> Option<Variant> {
        match self.model_type.as_str() {
            "deepseek_v2" => Some(Variant::V2),
            "deepseek_v3" => Some(Variant::V3),
            _ => None,
        }
    }

    /// `max_position_embeddings`, or transformers' default for the variant.
    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
            .unwrap_or(match self.variant() {
                Some(Variant::V2) => 2048,
                _ => 4096,
            })
    }

    /// Whether model layer `l` has a sparse MoE block.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        l >= self.first_k_dense_replace && self.n_routed_experts > 0
    }

    /// Number of shared experts (they run as one MLP of `n * moe_intermediate_size`).
    pub fn shared_experts(&self, v: Variant) -> usize {
        self.n_shared_experts.unwrap_or(match v {
            Variant::V2 => 2,
            Variant::V3 => 1,
        })
    }

    fn rope_params(&self) -> Option<&RopeParameters> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }

    fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The attention softmax scale, as transformers' `yarn_apply_mscale`.
    fn softmax_scale(&self) -> f64 {
        let mut scale = (self.qk_head_dim() as f64).powf(-0.5);
        if let Some(p) = self.rope_params() {
            if p.kind() != "default" {
                if let (Some(m), Some(f)) = (p.mscale_all_dim.filter(|&m| m != 0.0), p.factor) {
                    let ms = yarn_mscale(f, m);
                    scale *= ms * ms;
                }
            }
        }
        scale
    }

    /// The router of an MoE layer (bias: V3's `e_score_correction_bias`).
    fn scoring(&self, v: Variant, bias: Option<Vec<f32>>) -> RouterScoring {
        let scaling = self.routed_scaling_factor.unwrap_or(match v {
            Variant::V2 => 1.0,
            Variant::V3 => 2.5,
        }) as f32;
        match v {
            Variant::V2 => {
                let (ng, tg) = if self.topk_method.as_deref() == Some("group_limited_greedy") {
                    (self.n_group.unwrap_or(1), self.topk_group.unwrap_or(1))
                } else {
                    (1, 1)
                };
                RouterScoring::deepseek_v2(ng, tg, scaling)
            }
            Variant::V3 => RouterScoring::deepseek_v3(
                bias,
                self.n_group.unwrap_or(8),
                self.topk_group.unwrap_or(4),
                self.norm_topk_prob.unwrap_or(true),
                scaling,
            ),
        }
    }

    /// Rejects routing configurations the router cannot honour.
    fn validate(&self, v: Variant) -> std::result::Result<(), String> {
        let e = self.n_routed_experts;
        let k = self.num_experts_per_tok;
        if let (Variant::V2, Some(m)) = (v, self.topk_method.as_deref()) {
            if m != "greedy" && m != "group_limited_greedy" {
                return Err(format!(
                    "topk_method '{m}' is not supported (DeepSeek-V2: greedy, group_limited_greedy)"
                ));
            }
        }
        if k == 0 || k > e {
            return Err(format!("num_experts_per_tok {k} must be in 1..={e}"));
        }
        if self.num_attention_heads == 0 || !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err("num_attention_heads must be > 0 and qk_rope_head_dim even".into());
        }
        if let Some(g) = self.scoring(v, None).groups {
            let size = e.checked_div(g.n_group).unwrap_or(0);
            if g.n_group == 0 || !e.is_multiple_of(g.n_group) || g.topk_group == 0 {
                return Err(format!(
                    "n_group {} must divide n_routed_experts {e}, topk_group must be > 0",
                    g.n_group
                ));
            }
            if v == Variant::V3 && size < 2 {
                return Err("DeepSeek-V3 groups need at least 2 experts".into());
            }
            if k > g.topk_group.min(g.n_group) * size {
                return Err(format!(
                    "num_experts_per_tok {k} exceeds the experts of topk_group {} groups",
                    g.topk_group
                ));
            }
        }
        Ok(())
    }
}

/// Multi-head latent attention (MLA): keys and values from a compressed latent, which
/// is what the KV cache holds, plus a decoupled RoPE key shared by all heads.
#[derive(Debug, Clone)]
pub(super) struct Attention {
    /// `q_a_proj` + `q_a_layernorm` when `q_lora_rank` is set.
    q_a: Option<(Dense, RmsNorm)>,
    /// `q_proj`, or `q_b_proj` after `q_a`.
    q: Dense,
    kv_a: Dense,
    kv_norm: RmsNorm,
    kv_b: Dense,
    o: Dense,
}

/// A loaded DeepSeek-V2 / V3 model.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: Config,
    pub variant: Variant,
    pub(super) stack: DecoderStack<Attention>,
    rope: RotaryEmbedding,
}

fn mlp(ck: &Checkpoint, p: &str, h: usize, inter: usize, device: &Device) -> Result<SwiGlu> {
    SwiGlu::load(
        ck,
        [
            &format!("{p}.gate_proj"),
            &format!("{p}.up_proj"),
            &format!("{p}.down_proj"),
        ],
        h,
        inter,
        device,
    )
}

impl Model {
    /// Loads the weights of `ck` (whose config is `config`) onto `device`.
    pub fn load(ck: &Checkpoint, config: Config, device: &Device) -> Result<Model> {
        let bad = |msg: String| ModelError::file(&ck.config_path(), msg);
        let variant = config.variant().ok_or_else(|| {
            bad(format!(
                "model_type {} is not DeepSeek-V2/V3",
                config.model_type
            ))
        })?;
        config.validate(variant).map_err(bad)?;
        let c = &config;
        let (h, nh, eps) = (c.hidden_size, c.num_attention_heads, c.rms_norm_eps);
        let (qk, rank) = (c.qk_head_dim(), c.kv_lora_rank);
        let rope = RotaryEmbedding::from_config(
            c.rope_params(),
            c.rope_theta,
            10_000.0,
            c.qk_rope_head_dim,
            c.max_position_embeddings(),
        )
        .map_err(bad)?;
        let stack = StackConfig {
            vocab_size: c.vocab_size,
            hidden_size: h,
            num_hidden_layers: c.num_hidden_layers,
            rms_norm_eps: eps,
            tie_word_embeddings: c.tie_word_embeddings,
        };
        let stack = DecoderStack::load(ck, stack, device, |l, p| {
            let attn = format!("{p}.self_attn");
            let (q_a, q) = match c.q_lora_rank {
                None => (
                    None,
                    Dense::load(ck, &format!("{attn}.q_proj"), nh * qk, h, device)?,
                ),
                Some(r) => (
                    Some((
                        Dense::load(ck, &format!("{attn}.q_a_proj"), r, h, device)?,
                        RmsNorm::load(
                            ck,
                            &format!("{attn}.q_a_layernorm"),
                            r,
                            LATENT_NORM_EPS,
                            device,
                        )?,
                    )),
                    Dense::load(ck, &format!("{attn}.q_b_proj"), nh * qk, r, device)?,
                ),
            };
            let ffn = if c.is_moe_layer(l) {
                FeedForward::Sparse(Box::new(load_moe(ck, c, variant, l, device)?))
            } else {
                FeedForward::Dense(Box::new(mlp(
                    ck,
                    &format!("{p}.mlp"),
                    h,
                    c.intermediate_size,
                    device,
                )?))
            };
            let attention = Attention {
                q_a,
                q,
                kv_a: Dense::load(
                    ck,
                    &format!("{attn}.kv_a_proj_with_mqa"),
                    rank + c.qk_rope_head_dim,
                    h,
                    device,
                )?,
                kv_norm: RmsNorm::load(
                    ck,
                    &format!("{attn}.kv_a_layernorm"),
                    rank,
                    LATENT_NORM_EPS,
                    device,
                )?,
                kv_b: Dense::load(
                    ck,
                    &format!("{attn}.kv_b_proj"),
                    nh * (c.qk_nope_head_dim + c.v_head_dim),
                    rank,
                    device,
                )?,
                o: Dense::load(ck, &format!("{attn}.o_proj"), h, nh * c.v_head_dim, device)?,
            };
            Ok((attention, ffn))
        })?;
        Ok(Model {
            rope,
            variant,
            stack,
            config,
        })
    }

    /// Whether the rope dimensions come as interleaved pairs.
    fn interleaved(&self) -> bool {
        match self.variant {
            Variant::V2 => true,
            Variant::V3 => self.config.rope_interleave.unwrap_or(true),
        }
    }

    /// Runs `tokens` after the positions already in `cache`; returns logits `[T, vocab]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        observer: &mut dyn RoutingObserver,
    ) -> Result<Tensor<2>> {
        let device = self.stack.device();
        let t = tokens.len();
        let past = cache.len();
        let c = &self.config;
        let (nh, nope, rd, vd) = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        );
        let (qk, rank) = (nope + rd, c.kv_lora_rank);
        let (cos, sin) = self.rope.tables(past, t, &device);
        let mask = causal_mask(t, past, None, &device);
        let scale = c.softmax_scale();
        let rot = |x: Tensor<3>| {
            let x = if self.interleaved() {
                deinterleave(x)
            } else {
                x
            };
            apply_rope(x, &cos, &sin)
        };
        self.stack.forward(tokens, past, observer, |l, layer, n| {
            let q = match &layer.q_a {
                None => layer.q.forward(n.clone()),
                Some((a, norm)) => layer.q.forward(norm.forward(a.forward(n.clone()))),
            };
            let q = q.reshape([t, nh, qk]).swap_dims(0, 1);
            let q_nope = q.clone().slice([0..nh, 0..t, 0..nope]);
            let q_pe = rot(q.slice([0..nh, 0..t, nope..qk]));
            let ckv = layer.kv_a.forward(n);
            let latent = layer
                .kv_norm
                .forward(ckv.clone().slice([0..t, 0..rank]))
                .unsqueeze_dim::<3>(0);
            let k_pe = rot(ckv.slice([0..t, rank..rank + rd]).unsqueeze_dim::<3>(0));
            let (latent, k_pe) = cache.append(l, latent, k_pe);
            let s = latent.dims()[1];
            let kv = layer
                .kv_b
                .forward(latent.reshape([s, rank]))
                .reshape([s, nh, nope + vd])
                .swap_dims(0, 1);
            let k_nope = kv.clone().slice([0..nh, 0..s, 0..nope]);
            let v = kv.slice([0..nh, 0..s, nope..nope + vd]);
            let k = Tensor::cat(vec![k_nope, k_pe.repeat_dim(0, nh)], 2);
            let q = Tensor::cat(vec![q_nope, q_pe], 2);
            layer.o.forward(attention(q, k, v, mask.clone(), scale))
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
    let (h, e) = (c.hidden_size, c.n_routed_experts);
    let block = format!("model.layers.{l}.mlp");
    let expert_tensors: Vec<[String; 3]> = (0..e)
        .map(|i| ["gate_proj", "up_proj", "down_proj"].map(|n| format!("{block}.experts.{i}.{n}")))
        .collect();
    let experts = (0..e)
        .filter(|_| ck.loads_routed_experts())
        .map(|i| {
            mlp(
                ck,
                &format!("{block}.experts.{i}"),
                h,
                c.moe_intermediate_size,
                device,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let n_shared = c.shared_experts(variant);
    let shared = if n_shared > 0 {
        Some(SharedExpert {
            mlp: mlp(
                ck,
                &format!("{block}.shared_experts"),
                h,
                n_shared * c.moe_intermediate_size,
                device,
            )?,
            gate: None,
        })
    } else {
        None
    };
    let bias_name = format!("{block}.gate.e_score_correction_bias");
    let bias = if variant == Variant::V3 && ck.contains(&bias_name) {
        Some(ck.tensor_f32(&bias_name, &[e])?)
    } else {
        None
    };
    Ok(SparseMoe {
        layer: l,
        router: Dense::load(ck, &format!("{block}.gate"), e, h, device)?,
        scoring: c.scoring(variant, bias),
        top_k: c.num_experts_per_tok,
        experts,
        expert_tensors,
        shared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"{{"model_type": "deepseek_v3", "vocab_size": 16, "hidden_size": 8,
            "intermediate_size": 8, "moe_intermediate_size": 4, "num_hidden_layers": 2,
            "num_attention_heads": 2, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "kv_lora_rank": 4, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128{extra}}}"#
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn softmax_scale_applies_yarn_mscale() {
        let plain = config("");
        assert!((plain.softmax_scale() - 192f64.powf(-0.5)).abs() < 1e-12);
        let yarn = config(
            r#", "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}"#,
        );
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((yarn.softmax_scale() - 192f64.powf(-0.5) * m * m).abs() < 1e-12);
    }

    #[test]
    fn routing_config_is_validated() {
        // defaults: 8 groups of 1 expert cannot be scored by their two best
        assert!(config("").validate(Variant::V3).is_err());
        assert!(config(r#", "n_group": 4, "topk_group": 2"#)
            .validate(Variant::V3)
            .is_ok());
        // 2 groups of 4, keep 1: top-5 cannot fit
        let mut c = config(r#", "n_group": 2, "topk_group": 1"#);
        c.num_experts_per_tok = 5;
        assert!(c.validate(Variant::V3).is_err());
    }
}
