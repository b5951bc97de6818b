//! Building blocks shared by the architecture files: linear maps loaded from
//! checkpoints, RMSNorm, rotary position embeddings, causal attention with a KV cache,
//! and the SwiGLU feed-forward every expert uses.

use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::checkpoint::Checkpoint;
use crate::error::Result;

/// `y = x W^T + b` with `W` stored as Hugging Face does (`[out, in]`).
#[derive(Debug, Clone)]
pub struct Dense {
    /// Transposed weight, `[in, out]`.
    pub weight: Tensor<2>,
    pub bias: Option<Tensor<1>>,
}

impl Dense {
    /// Loads `{name}.weight` (`[out, in]`) and `{name}.bias` if the checkpoint has one.
    pub fn load(
        ck: &Checkpoint,
        name: &str,
        out: usize,
        inp: usize,
        device: &Device,
    ) -> Result<Dense> {
        let w = ck.tensor_f32(&format!("{name}.weight"), &[out, inp])?;
        let bias_name = format!("{name}.bias");
        let bias = if ck.contains(&bias_name) {
            Some(ck.tensor_f32(&bias_name, &[out])?)
        } else {
            None
        };
        Ok(Dense::from_f32(w, bias, out, inp, device))
    }

    /// From a Hugging Face weight `[out, in]` (row-major values) and optional bias.
    pub fn from_f32(
        w: Vec<f32>,
        bias: Option<Vec<f32>>,
        out: usize,
        inp: usize,
        device: &Device,
    ) -> Dense {
        Dense {
            weight: Tensor::<2>::from_data(TensorData::new(w, [out, inp]), device).transpose(),
            bias: bias.map(|b| Tensor::<1>::from_data(TensorData::new(b, [out]), device)),
        }
    }

    /// The output projection `lm_head`, or the transposed embedding table `embed`
    /// (`[vocab, hidden]`) when the config ties them and the checkpoint has no
    /// `lm_head.weight`.
    pub fn load_lm_head(
        ck: &Checkpoint,
        embed: &Tensor<2>,
        tie_word_embeddings: bool,
        device: &Device,
    ) -> Result<Dense> {
        let [vocab, hidden] = embed.dims();
        if tie_word_embeddings && !ck.contains("lm_head.weight") {
            Ok(Dense {
                weight: embed.clone().transpose(),
                bias: None,
            })
        } else {
            Dense::load(ck, "lm_head", vocab, hidden, device)
        }
    }

    /// `x`: `[T, in]` -> `[T, out]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = x.matmul(self.weight.clone());
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze_dim(0),
            None => y,
        }
    }
}

/// Rows of the embedding table `embed` (`[vocab, hidden]`) for `tokens`: `[T, hidden]`.
pub fn embed_tokens(embed: &Tensor<2>, tokens: &[u32]) -> Tensor<2> {
    let ids: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
    let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [tokens.len()]), &embed.device());
    embed.clone().select(0, ids)
}

/// Loads a 1-D tensor.
pub fn load_vector(ck: &Checkpoint, name: &str, len: usize, device: &Device) -> Result<Tensor<1>> {
    let v = ck.tensor_f32(name, &[len])?;
    Ok(Tensor::<1>::from_data(TensorData::new(v, [len]), device))
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor<1>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(
        ck: &Checkpoint,
        name: &str,
        len: usize,
        eps: f64,
        device: &Device,
    ) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: load_vector(ck, &format!("{name}.weight"), len, device)?,
            eps,
        })
    }

    /// Normalises the last dimension of a rank-`D` tensor.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let var = x.clone().powi_scalar(2).mean_dim(D - 1);
        let w = self.weight.clone().unsqueeze::<D>();
        x * (var + self.eps).sqrt().recip() * w
    }
}

/// Applies rotary embeddings to `x`: `[heads, T, head_dim]`.
pub fn apply_rope(x: Tensor<3>, cos: &Tensor<3>, sin: &Tensor<3>) -> Tensor<3> {
    let [h, t, d] = x.dims();
    let x1 = x.clone().slice([0..h, 0..t, 0..d / 2]);
    let x2 = x.clone().slice([0..h, 0..t, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    x * cos.clone() + rotated * sin.clone()
}

/// Keys and values of the tokens seen so far, per layer: `[kv_heads, S, head_dim]`.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<3>, Tensor<3>)>>,
}

impl KvCache {
    /// An empty cache for `n_layers` layers.
    pub fn new(n_layers: usize) -> KvCache {
        KvCache {
            layers: vec![None; n_layers],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[1])
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `k`, `v` of layer `l` and returns the full keys and values.
    pub fn append(&mut self, l: usize, k: Tensor<3>, v: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let (k, v) = match self.layers[l].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 1), Tensor::cat(vec![pv, v], 1)),
            None => (k, v),
        };
        self.layers[l] = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// Additive causal mask `[1, T, S]` for `T` new queries after `past` cached positions
/// (0 where key `j <= past + i`, `-inf` after), optionally limited to a sliding window.
pub fn causal_mask(t: usize, past: usize, window: Option<usize>, device: &Device) -> Tensor<3> {
    let s = past + t;
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        let q = past + i;
        for j in 0..s {
            let future = j > q;
            let too_old = window.is_some_and(|w| q >= w && j <= q - w);
            if future || too_old {
                m[i * s + j] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::<3>::from_data(TensorData::new(m, [1, t, s]), device)
}

/// Scaled dot-product attention with grouped KV heads.
/// `q`: `[heads, T, d]`, `k`: `[kv_heads, S, d]`, `v`: `[kv_heads, S, dv]`, `mask`:
/// `[1, T, S]` -> `[T, heads * dv]`.
pub fn attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    mask: Tensor<3>,
    scale: f64,
) -> Tensor<2> {
    attention_with_sinks(q, k, v, mask, scale, None)
}

/// [`attention`] with optional attention sinks (GPT-OSS): one logit per head, `[heads]`,
/// that joins every softmax row as an extra key and is then dropped, so the weights of
/// the real keys sum to less than one.
pub fn attention_with_sinks(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    mask: Tensor<3>,
    scale: f64,
    sinks: Option<&Tensor<1>>,
) -> Tensor<2> {
    let [h, t, _] = q.dims();
    let [kvh, s, _] = k.dims();
    let dv = v.dims()[2];
    let rep = h / kvh;
    let expand = |x: Tensor<3>| -> Tensor<3> {
        let [_, s, d] = x.dims();
        if rep == 1 {
            x
        } else {
            x.unsqueeze_dim::<4>(1)
                .repeat_dim(1, rep)
                .reshape([h, s, d])
        }
    };
    let (k, v) = (expand(k), expand(v));
    let scores = q.matmul(k.swap_dims(1, 2)) * scale + mask;
    let probs = match sinks {
        None => softmax(scores, 2),
        Some(sinks) => {
            let sink = sinks.clone().reshape([h, 1, 1]).repeat_dim(1, t);
            softmax(Tensor::cat(vec![scores, sink], 2), 2).slice([0..h, 0..t, 0..s])
        }
    };
    probs.matmul(v).swap_dims(0, 1).reshape([t, h * dv])
}

/// The gated activation of a [`SwiGlu`]: how `gate(x)` and `up(x)` are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GluActivation {
    /// `silu(gate) * up` (Llama, Mixtral, Qwen, OLMoE, DeepSeek).
    Silu,
    /// GPT-OSS: `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`,
    /// `(u + 1) * g * sigmoid(alpha * g)`.
    ClampedSwish { alpha: f64, limit: f64 },
}

/// A gated feed-forward: `down(act(gate(x), up(x)))`. Every expert is one.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    pub gate: Dense,
    pub up: Dense,
    pub down: Dense,
    pub act: GluActivation,
}

impl SwiGlu {
    /// Loads three projections by their full tensor-name prefixes (SiLU activation).
    pub fn load(
        ck: &Checkpoint,
        names: [&str; 3],
        hidden: usize,
        inter: usize,
        device: &Device,
    ) -> Result<SwiGlu> {
        Ok(SwiGlu {
            gate: Dense::load(ck, names[0], inter, hidden, device)?,
            up: Dense::load(ck, names[1], inter, hidden, device)?,
            down: Dense::load(ck, names[2], hidden, inter, device)?,
            act: GluActivation::Silu,
        })
    }

    /// `x`: `[T, hidden]` -> `[T, hidden]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let g = self.gate.forward(x.clone());
        let u = self.up.forward(x);
        let a = match self.act {
            GluActivation::Silu => silu(g) * u,
            GluActivation::ClampedSwish { alpha, limit } => {
                let g = g.clamp_max(limit);
                let u = u.clamp(-limit, limit);
                let glu = g.clone() * sigmoid(g * alpha);
                (u + 1.0) * glu
            }
        };
        self.down.forward(a)
    }
}

/// Copies a tensor's values to a `Vec<f32>`.
pub fn to_vec<const D: usize>(x: Tensor<D>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 tensor data")
}
