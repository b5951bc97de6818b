//! The trainable tiny Qwen3-MoE: a Burn [`Module`] that computes, for a batch of
//! sequences, exactly what [`inference::models::llama_moe`] computes for `qwen3_moe` at
//! inference (RMSNorm, per-head q/k RMSNorm, rotate-half RoPE, grouped-query causal
//! attention, softmax router with top-k renormalised weights, SwiGLU experts).
//!
//! Weights are stored `[in, out]` (so `x.matmul(w)`); the export transposes them to the
//! Hugging Face `[out, in]` layout. The top-k choice runs on the host with the runtime's
//! own [`RouterScoring`], so training and inference pick the same experts; the gradient
//! reaches the router through the renormalised weights of the chosen experts and the
//! load-balancing loss.

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::TinyMoeConfig;
use inference::layers::{causal_mask, to_vec};
use inference::rope::RotaryEmbedding;
use inference::routing::RouterScoring;

/// One SwiGLU expert: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Expert {
    /// `[hidden, inter]`.
    pub gate: Param<Tensor<2>>,
    /// `[hidden, inter]`.
    pub up: Param<Tensor<2>>,
    /// `[inter, hidden]`.
    pub down: Param<Tensor<2>>,
}

impl Expert {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let g = x.clone().matmul(self.gate.val());
        let u = x.matmul(self.up.val());
        (silu(g) * u).matmul(self.down.val())
    }
}

/// One decoder layer: attention and a sparse MoE feed-forward.
#[derive(Module, Debug)]
pub struct Block {
    /// `input_layernorm`, `[hidden]`.
    pub input_norm: Param<Tensor<1>>,
    /// `post_attention_layernorm`, `[hidden]`.
    pub post_norm: Param<Tensor<1>>,
    /// `[hidden, heads * head_dim]`.
    pub q: Param<Tensor<2>>,
    /// `[hidden, kv_heads * head_dim]`.
    pub k: Param<Tensor<2>>,
    /// `[hidden, kv_heads * head_dim]`.
    pub v: Param<Tensor<2>>,
    /// `[heads * head_dim, hidden]`.
    pub o: Param<Tensor<2>>,
    /// Per-head query RMSNorm, `[head_dim]`.
    pub q_norm: Param<Tensor<1>>,
    /// Per-head key RMSNorm, `[head_dim]`.
    pub k_norm: Param<Tensor<1>>,
    /// `mlp.gate`, `[hidden, experts]`.
    pub router: Param<Tensor<2>>,
    /// Routed experts.
    pub experts: Vec<Expert>,
}

/// The whole model.
#[derive(Module, Debug)]
pub struct TinyMoe {
    /// `[vocab, hidden]`.
    pub embed: Param<Tensor<2>>,
    /// Decoder layers.
    pub layers: Vec<Block>,
    /// Final RMSNorm, `[hidden]`.
    pub norm: Param<Tensor<1>>,
    /// `[hidden, vocab]`; `None` when tied to the embedding.
    pub lm_head: Option<Param<Tensor<2>>>,
    /// The shape.
    #[module(skip)]
    pub config: TinyMoeConfig,
}

/// What one forward pass returns.
pub struct ForwardOutput {
    /// `[batch * seq, vocab]`.
    pub logits: Tensor<2>,
    /// Load-balancing loss averaged over layers, `[1]`:
    /// `E * sum_e f_e * P_e` with `f_e` the share of routed slots that went to expert `e`
    /// and `P_e` its mean router probability (1 when perfectly balanced).
    pub aux_loss: Tensor<1>,
    /// Per layer, the chosen expert ids, `[batch * seq * top_k]` (rank order per token).
    pub routing: Vec<Vec<u32>>,
}

/// Normal samples by Box-Muller from a seeded generator.
fn normal(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-12);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

fn matrix(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    std: f64,
    device: &Device,
) -> Param<Tensor<2>> {
    let data = TensorData::new(normal(rng, rows * cols, std), [rows, cols]);
    Param::from_data(data, device)
}

fn ones(len: usize, device: &Device) -> Param<Tensor<1>> {
    Param::from_data(TensorData::new(vec![1f32; len], [len]), device)
}

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension (as [`inference::layers::RmsNorm`]).
fn rms_norm<const D: usize>(x: Tensor<D>, w: &Param<Tensor<1>>, eps: f64) -> Tensor<D> {
    let var = x.clone().powi_scalar(2).mean_dim(D - 1);
    x * (var + eps).sqrt().recip() * w.val().unsqueeze::<D>()
}

/// Rotate-half RoPE on `[B, heads, T, d]` with tables `[1, 1, T, d]`.
fn rope4(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

impl TinyMoe {
    /// A freshly initialised model: matrices N(0, 0.02) (residual outputs scaled by
    /// `1/sqrt(2 * layers)`), norms 1. The same seed gives the same weights.
    pub fn init(config: &TinyMoeConfig, seed: u64, device: &Device) -> TinyMoe {
        let c = config;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7417_4d6f_4549_6e69);
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.moe_intermediate_size);
        let std = 0.02;
        let out_std = std / (2.0 * c.num_layers as f64).sqrt();
        let embed = matrix(&mut rng, c.vocab_size, h, std, device);
        let layers = (0..c.num_layers)
            .map(|_| Block {
                input_norm: ones(h, device),
                post_norm: ones(h, device),
                q: matrix(&mut rng, h, c.num_heads * hd, std, device),
                k: matrix(&mut rng, h, c.num_kv_heads * hd, std, device),
                v: matrix(&mut rng, h, c.num_kv_heads * hd, std, device),
                o: matrix(&mut rng, c.num_heads * hd, h, out_std, device),
                q_norm: ones(hd, device),
                k_norm: ones(hd, device),
                router: matrix(&mut rng, h, c.num_experts, std, device),
                experts: (0..c.num_experts)
                    .map(|_| Expert {
                        gate: matrix(&mut rng, h, inter, std, device),
                        up: matrix(&mut rng, h, inter, std, device),
                        down: matrix(&mut rng, inter, h, out_std, device),
                    })
                    .collect(),
            })
            .collect();
        let lm_head = (!c.tie_embeddings).then(|| matrix(&mut rng, h, c.vocab_size, std, device));
        TinyMoe {
            embed,
            layers,
            norm: ones(h, device),
            lm_head,
            config: config.clone(),
        }
    }

    /// Ids of the 1-D parameters (norm weights), which get no weight decay.
    pub fn norm_param_ids(&self) -> Vec<ParamId> {
        let mut ids = vec![self.norm.id];
        for l in &self.layers {
            ids.extend([l.input_norm.id, l.post_norm.id, l.q_norm.id, l.k_norm.id]);
        }
        ids
    }

    /// Runs `batch` sequences of `seq` tokens (`ids` row-major, every id below the
    /// vocabulary size) from position 0.
    pub fn forward(&self, ids: &[u32], batch: usize, seq: usize) -> ForwardOutput {
        assert_eq!(ids.len(), batch * seq, "ids must hold batch * seq tokens");
        let c = &self.config;
        let device = self.embed.val().device();
        let n = batch * seq;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let idx: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &device);
        let mut x = self.embed.val().select(0, idx);
        let rope = RotaryEmbedding::from_config(None, Some(c.rope_theta), c.rope_theta, hd, seq)
            .expect("plain RoPE of a validated head dimension");
        let (cos, sin) = rope.tables(0, seq, &device);
        let (cos, sin) = (cos.unsqueeze::<4>(), sin.unsqueeze::<4>());
        let mask = causal_mask(seq, 0, None, &device).unsqueeze::<4>();
        let scale = 1.0 / (hd as f64).sqrt();
        let mut aux = Tensor::<1>::zeros([1], &device);
        let mut routing = Vec::with_capacity(c.num_layers);
        for layer in &self.layers {
            let h_in = rms_norm(x.clone(), &layer.input_norm, c.rms_norm_eps);
            let heads = |w: &Param<Tensor<2>>, nheads: usize| {
                h_in.clone()
                    .matmul(w.val())
                    .reshape([batch, seq, nheads, hd])
                    .swap_dims(1, 2)
            };
            let q = rms_norm(heads(&layer.q, nh), &layer.q_norm, c.rms_norm_eps);
            let k = rms_norm(heads(&layer.k, nkv), &layer.k_norm, c.rms_norm_eps);
            let v = heads(&layer.v, nkv);
            let q = rope4(q, &cos, &sin);
            let k = rope4(k, &cos, &sin);
            let rep = nh / nkv;
            let expand = |t: Tensor<4>| -> Tensor<4> {
                if rep == 1 {
                    t
                } else {
                    t.unsqueeze_dim::<5>(2)
                        .repeat_dim(2, rep)
                        .reshape([batch, nh, seq, hd])
                }
            };
            let (k, v) = (expand(k), expand(v));
            let scores = q.matmul(k.swap_dims(2, 3)) * scale + mask.clone();
            let a = softmax(scores, 3)
                .matmul(v)
                .swap_dims(1, 2)
                .reshape([n, nh * hd]);
            let h = x + a.matmul(layer.o.val());
            let f_in = rms_norm(h.clone(), &layer.post_norm, c.rms_norm_eps);
            let (f, layer_aux, ids) = self.moe(layer, f_in);
            aux = aux + layer_aux;
            routing.push(ids);
            x = h + f;
        }
        let x = rms_norm(x, &self.norm, c.rms_norm_eps);
        let logits = match &self.lm_head {
            Some(w) => x.matmul(w.val()),
            None => x.matmul(self.embed.val().transpose()),
        };
        ForwardOutput {
            logits,
            aux_loss: aux / c.num_layers as f64,
            routing,
        }
    }

    /// The sparse MoE block on `x` `[N, hidden]`: output, load-balancing loss, chosen ids.
    fn moe(&self, layer: &Block, x: Tensor<2>) -> (Tensor<2>, Tensor<1>, Vec<u32>) {
        let c = &self.config;
        let (e, k) = (c.num_experts, c.top_k);
        let [n, hidden] = x.dims();
        let device = x.device();
        let logits = x.clone().matmul(layer.router.val());
        let host = to_vec(logits.clone().detach());
        let scoring = RouterScoring::softmax_topk(true);
        let mut chosen = Vec::with_capacity(n * k);
        let mut per_expert: Vec<(Vec<i64>, Vec<i64>)> = vec![(Vec::new(), Vec::new()); e];
        let mut counts = vec![0f32; e];
        for (tok, row) in host.chunks_exact(e).enumerate() {
            let d = scoring.route(row, k);
            for (slot, &id) in d.ids.iter().enumerate() {
                chosen.push(id);
                per_expert[id as usize].0.push(tok as i64);
                per_expert[id as usize].1.push((tok * k + slot) as i64);
                counts[id as usize] += 1.0;
            }
        }
        let probs = softmax(logits, 1);
        let chosen_idx: Vec<i64> = chosen.iter().map(|&i| i as i64).collect();
        let chosen_idx = Tensor::<2, Int>::from_data(TensorData::new(chosen_idx, [n, k]), &device);
        let top = probs.clone().gather(1, chosen_idx);
        let weights = (top.clone() / top.sum_dim(1)).reshape([n * k, 1]);
        let mut out = Tensor::<2>::zeros([n, hidden], &device);
        for (id, (tokens, slots)) in per_expert.into_iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let m = tokens.len();
            let tok = Tensor::<1, Int>::from_data(TensorData::new(tokens, [m]), &device);
            let slot = Tensor::<1, Int>::from_data(TensorData::new(slots, [m]), &device);
            let w = weights.clone().select(0, slot);
            let y = layer.experts[id].forward(x.clone().select(0, tok.clone())) * w;
            out = out.select_assign(0, tok, y, IndexingUpdateOp::Add);
        }
        let share: Vec<f32> = counts.iter().map(|&c| c / (n * k) as f32).collect();
        let share = Tensor::<2>::from_data(TensorData::new(share, [1, e]), &device);
        let aux = (probs.mean_dim(0) * share).sum() * e as f64;
        (out, aux, chosen)
    }

    /// Mean next-token cross-entropy of `logits` `[N, vocab]` against `targets` (`N` ids).
    pub fn cross_entropy(logits: Tensor<2>, targets: &[u32]) -> Tensor<1> {
        let n = targets.len();
        let device = logits.device();
        let t: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
        let t = Tensor::<2, Int>::from_data(TensorData::new(t, [n, 1]), &device);
        log_softmax(logits, 1).gather(1, t).mean().neg()
    }

    /// The logits of one sequence, `[T, vocab]`, as `MoeModel::forward` on an empty cache.
    pub fn logits(&self, ids: &[u32]) -> Tensor<2> {
        self.forward(ids, 1, ids.len()).logits
    }

    /// The same model with every weight rounded to bf16 (what the exported checkpoint holds).
    pub fn round_to_bf16(self) -> TinyMoe {
        struct Round;
        impl ModuleMapper for Round {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                param.map(|t| {
                    let shape = t.shape();
                    let device = t.device();
                    let v: Vec<f32> = to_vec(t.clone().detach())
                        .into_iter()
                        .map(|x| half::bf16::from_f32(x).to_f32())
                        .collect();
                    Tensor::from_data(TensorData::new(v, shape), &device)
                })
            }
        }
        self.map(&mut Round)
    }
}
