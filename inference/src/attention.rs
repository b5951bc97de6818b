//! Grouped-query attention, shared by the Llama-style MoE families (Mixtral, Qwen2-MoE,
//! Qwen3-MoE, OLMoE) and GPT-OSS:
//!
//! ```text
//! q, k, v = q_proj(n), k_proj(n), v_proj(n)      (OLMoE: q, k = norm(q), norm(k); clip_qkv)
//! q, k    = rope(q), rope(k)                     (Qwen3: per-head norms before RoPE)
//! out     = o_proj(softmax(q k^T * scale + mask [, sink]) v)
//! ```
//!
//! with key/value heads repeated over the query heads of their group, an optional
//! learned sink logit per head (GPT-OSS), and a sliding window on the layers that have
//! one. DeepSeek's latent attention (MLA) differs in what it caches and keeps its own.

use burn::tensor::{Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::layers::{
    apply_rope, attention_with_sinks, causal_mask, load_vector, Dense, KvCache, RmsNorm,
};
use crate::rope::RotaryEmbedding;

/// Which q/k normalisation a checkpoint has (what [`GroupedQueryAttention::load`] reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNormKind {
    None,
    /// Qwen3: `q_norm` / `k_norm` of size head_dim, per head, before RoPE.
    PerHead,
    /// OLMoE: `q_norm` / `k_norm` over the whole projection.
    Full,
}

/// The loaded q/k norms.
#[derive(Debug, Clone)]
enum QkNorm {
    None,
    PerHead(RmsNorm, RmsNorm),
    Full(RmsNorm, RmsNorm),
}

/// Head counts and sizes: `heads` query heads and `kv_heads` key/value heads of
/// `head_dim`, over a residual stream of `hidden`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What one layer's attention reads from `config.json` besides its shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionOptions {
    pub qk_norm: QkNormKind,
    /// The q/k norms' epsilon.
    pub rms_norm_eps: f64,
    /// `clip_qkv`: q, k and v clamped to `±clip` after their projections.
    pub clip_qkv: Option<f64>,
    /// A learned sink logit per head (`self_attn.sinks`).
    pub sinks: bool,
    /// This layer attends over a sliding window (the forward's [`AttentionInputs`] hold
    /// its mask).
    pub sliding: bool,
}

/// Grouped-query attention of one layer, output projection included.
#[derive(Debug, Clone)]
pub struct GroupedQueryAttention {
    q: Dense,
    k: Dense,
    v: Dense,
    o: Dense,
    qk_norm: QkNorm,
    clip_qkv: Option<f64>,
    sinks: Option<Tensor<1>>,
    sliding: bool,
    shape: AttentionShape,
}

impl GroupedQueryAttention {
    /// Loads `{prefix}.q_proj` .. `o_proj` (and the norms and sinks `options` name).
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        shape: AttentionShape,
        options: AttentionOptions,
        device: &Device,
    ) -> Result<GroupedQueryAttention> {
        let AttentionShape {
            hidden: h,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        } = shape;
        let eps = options.rms_norm_eps;
        let norm = |name: &str, size: usize| {
            RmsNorm::load(ck, &format!("{prefix}.{name}"), size, eps, device)
        };
        let qk_norm = match options.qk_norm {
            QkNormKind::None => QkNorm::None,
            QkNormKind::PerHead => QkNorm::PerHead(norm("q_norm", hd)?, norm("k_norm", hd)?),
            QkNormKind::Full => QkNorm::Full(norm("q_norm", nh * hd)?, norm("k_norm", nkv * hd)?),
        };
        let dense = |name: &str, out: usize, inp: usize| {
            Dense::load(ck, &format!("{prefix}.{name}"), out, inp, device)
        };
        Ok(GroupedQueryAttention {
            q: dense("q_proj", nh * hd, h)?,
            k: dense("k_proj", nkv * hd, h)?,
            v: dense("v_proj", nkv * hd, h)?,
            o: dense("o_proj", h, nh * hd)?,
            qk_norm,
            clip_qkv: options.clip_qkv,
            sinks: if options.sinks {
                Some(load_vector(ck, &format!("{prefix}.sinks"), nh, device)?)
            } else {
                None
            },
            sliding: options.sliding,
            shape,
        })
    }

    /// The attention block's output for the normalised input `n` (`[T, hidden]`) of
    /// layer `l`, its keys and values appended to `cache`.
    pub fn forward(
        &self,
        l: usize,
        n: Tensor<2>,
        inputs: &AttentionInputs,
        cache: &mut KvCache,
    ) -> Tensor<2> {
        let (t, hd) = (n.dims()[0], self.shape.head_dim);
        let (mut q, mut k, mut v) = (
            self.q.forward(n.clone()),
            self.k.forward(n.clone()),
            self.v.forward(n),
        );
        if let QkNorm::Full(qn, kn) = &self.qk_norm {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        if let Some(clip) = self.clip_qkv {
            q = q.clamp(-clip, clip);
            k = k.clamp(-clip, clip);
            v = v.clamp(-clip, clip);
        }
        let heads = |x: Tensor<2>, n: usize| x.reshape([t, n, hd]).swap_dims(0, 1);
        let (mut q, mut k, v) = (
            heads(q, self.shape.heads),
            heads(k, self.shape.kv_heads),
            heads(v, self.shape.kv_heads),
        );
        if let QkNorm::PerHead(qn, kn) = &self.qk_norm {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        let q = apply_rope(q, &inputs.cos, &inputs.sin);
        let k = apply_rope(k, &inputs.cos, &inputs.sin);
        let (k, v) = cache.append(l, k, v);
        debug_assert!(
            !self.sliding || inputs.sliding_mask.is_some(),
            "a sliding layer run without a window"
        );
        let mask = match (&inputs.sliding_mask, self.sliding) {
            (Some(m), true) => m.clone(),
            _ => inputs.full_mask.clone(),
        };
        let out = attention_with_sinks(q, k, v, mask, inputs.scale, self.sinks.as_ref());
        self.o.forward(out)
    }
}

/// Which of `n_layers` layers attend over `window`: as `layer_types` marks them
/// (`sliding_attention` / `full_attention`, one a layer) where the family reads it, else
/// as `default` says. Refused, as transformers cannot run them either: another type or
/// length, a sliding layer without a window, and a window of 0 (every key masked).
pub fn sliding_layers(
    window: Option<usize>,
    layer_types: Option<&[String]>,
    n_layers: usize,
    default: impl Fn(usize) -> bool,
) -> std::result::Result<Vec<bool>, String> {
    let sliding = match layer_types {
        Some(types) if types.len() != n_layers => {
            return Err(format!(
                "layer_types has {} entries for {n_layers} layers",
                types.len()
            ));
        }
        Some(types) => types
            .iter()
            .enumerate()
            .map(|(l, t)| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => Err(format!(
                    "layer_types: unknown attention type '{other}' (layer {l})"
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        None => (0..n_layers).map(default).collect(),
    };
    match (window, sliding.iter().position(|&s| s)) {
        (None, Some(l)) => Err(format!(
            "layer {l} attends over a sliding window but there is none (sliding_window null, or use_sliding_window false)"
        )),
        (Some(0), Some(_)) => Err("sliding_window 0 would mask every key".into()),
        _ => Ok(sliding),
    }
}

/// What every layer's attention in one forward shares: the rotary tables of its
/// positions, the causal masks and the softmax scale.
#[derive(Debug, Clone)]
pub struct AttentionInputs {
    cos: Tensor<3>,
    sin: Tensor<3>,
    full_mask: Tensor<3>,
    /// The causal mask limited to `sliding_window` (`None`: no layer slides).
    sliding_mask: Option<Tensor<3>>,
    scale: f64,
}

impl AttentionInputs {
    /// For `t` new tokens after `past` cached positions, heads of `head_dim`.
    pub fn new(
        rope: &RotaryEmbedding,
        past: usize,
        t: usize,
        head_dim: usize,
        sliding_window: Option<usize>,
        device: &Device,
    ) -> AttentionInputs {
        let (cos, sin) = rope.tables(past, t, device);
        AttentionInputs {
            cos,
            sin,
            full_mask: causal_mask(t, past, None, device),
            sliding_mask: sliding_window.map(|w| causal_mask(t, past, Some(w), device)),
            scale: 1.0 / (head_dim as f64).sqrt(),
        }
    }
}
