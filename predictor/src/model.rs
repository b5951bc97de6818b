//! The expert predictor: a small causal transformer over tokens, read by a per-query
//! head.
//!
//! Backbone input at position `t`: `embed(token_t) + R_ctx · routing_{t-1}`, where
//! `routing` is the multi-hot `(layer, expert)` vector of a token. Pre-LayerNorm
//! blocks with ALiBi attention (a per-head linear recency bias, Press et al. 2022: no
//! position embeddings, so the serving cache can slide past the training context).
//!
//! Head, for a query "the first `κ` layers of token `t` are known, predict layers
//! `κ .. κ+D`": `u = h_t + Σ_{j<κ} R_q[j] · routing_t[j] + layer_embed(κ)`,
//! `u += MLP(LN(u))`, logits of layer `j` = `LN(u) · W_out[j] + b[j]`.
//! Next-token prediction is the query `κ = 0, D = n_moe`.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig,
    Linear, LinearConfig,
};
use burn::tensor::{Device, Distribution, Int, Shape, Tensor, TensorData};

use crate::config::{PredictorConfig, Query};
use crate::fused::{self, layer_norm, silu, LAYER_NORM_EPS};

/// One pre-LayerNorm transformer block.
#[derive(Module, Debug)]
pub struct Block {
    pub attn_norm: LayerNorm,
    /// `[d, 3d]`: queries, keys, values.
    pub qkv: Linear,
    pub attn_out: Linear,
    pub ffn_norm: LayerNorm,
    pub ffn_in: Linear,
    pub ffn_out: Linear,
    pub dropout: Dropout,
}

/// Keys and values of one block for the positions seen so far (serving).
#[derive(Debug, Clone)]
pub struct BlockCache {
    /// `[1, heads, len, head_dim]`.
    pub k: Tensor<4>,
    /// `[1, heads, len, head_dim]`.
    pub v: Tensor<4>,
}

/// The whole predictor.
#[derive(Module, Debug)]
pub struct ExpertPredictor {
    /// `[token_buckets + 1, d]`.
    pub token_embed: Embedding,
    /// `[n_moe * n_experts, d]`: routing of the previous token.
    pub context_routing: Linear,
    pub blocks: Vec<Block>,
    pub final_norm: LayerNorm,
    /// `[n_moe, n_experts, d]`: known layers of the current token.
    pub query_routing: Param<Tensor<3>>,
    /// `[n_moe, d]`: which layer the forecast starts at.
    pub query_layer: Embedding,
    pub head_norm: LayerNorm,
    pub head_in: Linear,
    pub head_out: Linear,
    pub out_norm: LayerNorm,
    /// `[d, n_moe * n_experts]`: per-layer output weights, layer-major columns.
    pub output: Linear,
    /// Router input -> query contribution, when the features read router inputs.
    pub router_input_map: Option<RouterInputMap>,
    /// `[n_moe]`: weight of the count prior per target layer (with `token_prior`).
    pub prior_scale: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub config: PredictorConfig,
}

/// A router input's contribution to a query: `router_input_dim -> w -> d`, SiLU, with a
/// learned bias per source layer before the SiLU.
#[derive(Module, Debug)]
pub struct RouterInputMap {
    pub input: Linear,
    /// `[n_moe, w]`: which layer the router input comes from.
    pub layer: Embedding,
    pub output: Linear,
}

impl RouterInputMap {
    fn new(c: &PredictorConfig, device: &Device) -> Self {
        RouterInputMap {
            input: LinearConfig::new(c.router_input_dim, c.hidden_width).init(device),
            layer: EmbeddingConfig::new(c.routing.n_moe, c.hidden_width).init(device),
            output: LinearConfig::new(c.hidden_width, c.d_model).init(device),
        }
    }

    /// `x` `[n, router_input_dim]` of MoE layer `layer` -> `[n, d]`.
    fn forward(&self, x: Tensor<2>, layer: usize) -> Tensor<2> {
        let z = self.input.forward(x);
        let id =
            Tensor::<2, Int>::from_data(TensorData::new(vec![layer as i64], [1, 1]), &z.device());
        let [_, w] = z.dims();
        let bias = self.layer.forward(id).reshape([1, w]);
        self.output.forward(silu(z + bias))
    }
}

/// ALiBi slopes of `heads` heads: `2^(-8 (h+1) / heads)`.
fn alibi_slopes(heads: usize) -> Vec<f32> {
    (0..heads)
        .map(|h| 2f32.powf(-8.0 * (h + 1) as f32 / heads as f32))
        .collect()
}

impl Block {
    fn new(c: &PredictorConfig, device: &Device) -> Self {
        let d = c.d_model;
        Block {
            attn_norm: LayerNormConfig::new(d)
                .with_epsilon(LAYER_NORM_EPS)
                .init(device),
            qkv: LinearConfig::new(d, 3 * d).init(device),
            attn_out: LinearConfig::new(d, d).init(device),
            ffn_norm: LayerNormConfig::new(d)
                .with_epsilon(LAYER_NORM_EPS)
                .init(device),
            ffn_in: LinearConfig::new(d, c.ffn_mult * d).init(device),
            ffn_out: LinearConfig::new(c.ffn_mult * d, d).init(device),
            dropout: DropoutConfig::new(c.dropout).init(),
        }
    }

    /// `x`: `[b, s, d]`; `bias`: `[1, heads, s, s_kv]` ALiBi plus `-inf` on masked keys.
    /// With a cache, keys and values of `x` are appended to it first (and the oldest
    /// dropped beyond `window`).
    fn forward(
        &self,
        x: Tensor<3>,
        heads: usize,
        bias: Tensor<4>,
        cache: Option<&mut BlockCache>,
        window: usize,
        dropout_seed: Option<u64>,
    ) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let hd = d / heads;
        let qkv = self.qkv.forward(layer_norm(&self.attn_norm, x.clone()));
        let split = |i: usize| {
            qkv.clone()
                .narrow(2, i * d, d)
                .reshape([b, s, heads, hd])
                .swap_dims(1, 2)
        };
        let (q, mut k, mut v) = (split(0), split(1), split(2));
        if let Some(c) = cache {
            k = Tensor::cat(vec![c.k.clone(), k], 2);
            v = Tensor::cat(vec![c.v.clone(), v], 2);
            let len = k.dims()[2];
            if len > window {
                k = k.narrow(2, len - window, window);
                v = v.narrow(2, len - window, window);
            }
            c.k = k.clone();
            c.v = v.clone();
        }
        let y = fused::attention(q, k, v, bias)
            .swap_dims(1, 2)
            .reshape([b, s, d]);
        let attn = self.attn_out.forward(y);
        let x = x + dropout(&self.dropout, attn, dropout_seed.map(|s| mix(s, 1)));
        let f = self.ffn_out.forward(silu(
            self.ffn_in.forward(layer_norm(&self.ffn_norm, x.clone())),
        ));
        x + dropout(&self.dropout, f, dropout_seed.map(|s| mix(s, 2)))
    }
}

/// Runs `draw` with `device`'s generator seeded with `seed` and held: Burn's CPU
/// backends draw from one process-wide generator, so without the lock predictors or
/// tensors drawn at once on several threads (two training runs in one process, or
/// tests) would not get the values each would get alone.
pub fn seeded<T>(device: &Device, seed: u64, draw: impl FnOnce() -> T) -> T {
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = GENERATOR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    device.seed(seed);
    draw()
}

/// Draws every lazily initialised parameter it visits.
struct DrawNow;

impl ModuleVisitor for DrawNow {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.base();
    }
}

impl ExpertPredictor {
    /// A freshly initialised predictor on `device`, its weights drawn from `seed`
    /// (see [`seeded`]).
    pub fn new(config: &PredictorConfig, device: &Device, seed: u64) -> Self {
        seeded(device, seed, || {
            let model = Self::draw(config, device);
            // Burn draws a parameter lazily, at its first use: draw them all now while
            // the generator is ours, the query embeddings first, then in field order.
            let _ = model.query_routing.base();
            model.visit(&mut DrawNow);
            model
        })
    }

    /// The predictor's structure on `device`, for loading trained weights into or
    /// counting its parameters: Burn draws a parameter only at its first use, and
    /// loading a record replaces them undrawn, so none is drawn.
    pub fn to_load(config: &PredictorConfig, device: &Device) -> Self {
        Self::draw(config, device)
    }

    fn draw(config: &PredictorConfig, device: &Device) -> Self {
        let (d, r) = (config.d_model, config.routing);
        let width = r.width();
        let scale = (1.0 / (r.top_k as f64 * r.n_moe as f64)).sqrt();
        ExpertPredictor {
            token_embed: EmbeddingConfig::new(config.token_buckets + 1, d).init(device),
            context_routing: LinearConfig::new(width, d).with_bias(false).init(device),
            blocks: (0..config.n_layers)
                .map(|_| Block::new(config, device))
                .collect(),
            final_norm: LayerNormConfig::new(d)
                .with_epsilon(LAYER_NORM_EPS)
                .init(device),
            // Drawn lazily like the others (`to_load` draws nothing: a draw outside
            // `seeded` would take values from a predictor being built at once).
            query_routing: Param::uninitialized(
                ParamId::new(),
                move |device, require_grad| {
                    let t = Tensor::random(
                        [r.n_moe, r.n_experts, d],
                        Distribution::Normal(0.0, scale),
                        device,
                    );
                    if require_grad {
                        t.require_grad()
                    } else {
                        t
                    }
                },
                device.clone(),
                true,
                Shape::new([r.n_moe, r.n_experts, d]),
            ),
            query_layer: EmbeddingConfig::new(r.n_moe, d).init(device),
            head_norm: LayerNormConfig::new(d)
                .with_epsilon(LAYER_NORM_EPS)
                .init(device),
            head_in: LinearConfig::new(d, 2 * d).init(device),
            head_out: LinearConfig::new(2 * d, d).init(device),
            out_norm: LayerNormConfig::new(d)
                .with_epsilon(LAYER_NORM_EPS)
                .init(device),
            // With the prior path the context's logits start at zero: the untrained
            // predictor ranks exactly as its count prior.
            output: if config.token_prior {
                LinearConfig::new(d, width)
                    .with_initializer(Initializer::Zeros)
                    .init(device)
            } else {
                LinearConfig::new(d, width).init(device)
            },
            prior_scale: config
                .token_prior
                .then(|| Param::from_tensor(Tensor::ones([r.n_moe], device))),
            router_input_map: config
                .features
                .hidden()
                .then(|| RouterInputMap::new(config, device)),
            config: config.clone(),
        }
    }

    /// ALiBi bias for queries at positions `q_start..q_start+s` over keys
    /// `0..s_kv` (key `j` at position `j`), `-inf` on future keys: `[1, heads, s, s_kv]`.
    fn attention_bias(&self, s: usize, s_kv: usize, q_start: usize, device: &Device) -> Tensor<4> {
        let slopes = alibi_slopes(self.config.n_heads);
        let mut data = Vec::with_capacity(slopes.len() * s * s_kv);
        for slope in &slopes {
            for i in 0..s {
                let qi = q_start + i;
                for j in 0..s_kv {
                    data.push(if j > qi {
                        f32::NEG_INFINITY
                    } else {
                        -slope * (qi - j) as f32
                    });
                }
            }
        }
        Tensor::from_data(TensorData::new(data, [1, slopes.len(), s, s_kv]), device)
    }

    /// Backbone over whole windows: `tokens` `[b, s]`, `prev_routing` `[b, s, width]`
    /// -> `[b, s, d]`; dropout masks (in training) drawn from `dropout_seed` (see
    /// [`dropout`]).
    pub fn encode(
        &self,
        tokens: Tensor<2, Int>,
        prev_routing: Tensor<3>,
        dropout_seed: Option<u64>,
    ) -> Tensor<3> {
        let [_, s] = tokens.dims();
        let device = tokens.device();
        let mut x = self.token_embed.forward(tokens) + self.context_routing.forward(prev_routing);
        let bias = self.attention_bias(s, s, 0, &device);
        for (i, block) in self.blocks.iter().enumerate() {
            let seed = dropout_seed.map(|d| mix(d, i as u64));
            x = block.forward(x, self.config.n_heads, bias.clone(), None, s, seed);
        }
        layer_norm(&self.final_norm, x)
    }

    /// Backbone for new positions after the cached keys and values: `token` `[1, s]`,
    /// `prev_routing` `[1, s, width]` -> `[1, s, d]`, their keys and values appended to
    /// `caches`. One position at a time slides the attention window; several at once
    /// must fit in it with the cached ones (their queries see every cached key).
    pub fn encode_step(
        &self,
        token: Tensor<2, Int>,
        prev_routing: Tensor<3>,
        caches: &mut [BlockCache],
    ) -> Tensor<3> {
        let device = token.device();
        let window = self.config.context;
        let s = token.dims()[1];
        let mut x = self.token_embed.forward(token) + self.context_routing.forward(prev_routing);
        let cached = caches.first().map_or(0, |c| c.k.dims()[2]);
        assert!(
            s == 1 || cached + s <= window,
            "{s} new positions after {cached} cached exceed the window of {window}"
        );
        let s_kv = (cached + s).min(window);
        let bias = self.attention_bias(s, s_kv, s_kv - s, &device);
        for (block, cache) in self.blocks.iter().zip(caches.iter_mut()) {
            x = block.forward(
                x,
                self.config.n_heads,
                bias.clone(),
                Some(cache),
                window,
                None,
            );
        }
        layer_norm(&self.final_norm, x)
    }

    /// Empty caches for [`Self::encode_step`].
    pub fn empty_caches(&self, device: &Device) -> Vec<BlockCache> {
        let hd = self.config.d_model / self.config.n_heads;
        let empty = Tensor::<4>::zeros([1, self.config.n_heads, 0, hd], device);
        (0..self.config.n_layers)
            .map(|_| BlockCache {
                k: empty.clone(),
                v: empty.clone(),
            })
            .collect()
    }

    /// Per-layer contributions of the current token's routing to a query, summed over
    /// layers `< κ` for every `κ` in `0..n_moe`: `routing` `[n, width]` -> `[n_moe, n, d]`
    /// (entry `κ` holds the sum over the first `κ` layers).
    pub fn known_prefix(&self, routing: Tensor<2>) -> Tensor<3> {
        let r = self.config.routing;
        let [n, _] = routing.dims();
        let per_layer = routing
            .reshape([n, r.n_moe, r.n_experts])
            .swap_dims(0, 1)
            .matmul(self.query_routing.val());
        let inclusive = per_layer.cumsum(0);
        let zeros = Tensor::<3>::zeros([1, n, self.config.d_model], &inclusive.device());
        Tensor::cat(vec![zeros, inclusive.narrow(0, 0, r.n_moe - 1)], 0)
    }

    /// The query contribution of router inputs `x` `[n, router_input_dim]` of MoE layer
    /// `layer` (none when the features do not read them).
    pub fn hidden_prefix(&self, x: Tensor<2>, layer: usize) -> Option<Tensor<2>> {
        Some(self.router_input_map.as_ref()?.forward(x, layer))
    }

    /// The query input of the known layers: the ids prefix (`ids`, the query's entry of
    /// [`Self::known_prefix`]) and/or the router input `x` of the last known layer
    /// (`query.known - 1`), as the features say.
    pub fn query_prefix(&self, ids: Tensor<2>, x: Option<Tensor<2>>, query: Query) -> Tensor<2> {
        let f = self.config.features;
        let base = if f.ids() { ids } else { ids.zeros_like() };
        let layer = query.known.saturating_sub(1);
        match x.and_then(|x| self.hidden_prefix(x, layer)) {
            Some(h) => base + h,
            None => base,
        }
    }

    /// Logits of one query for `n` positions: `h` `[n, d]`, `prefix` `[n, d]` (the
    /// query's entry of [`Self::known_prefix`]), `prior` `[n, horizon * n_experts]` the
    /// count prior (see [`crate::prior`]; predictors with `token_prior`) ->
    /// `[n, horizon * n_experts]`, layer-major.
    pub fn query_logits(
        &self,
        h: Tensor<2>,
        prefix: Tensor<2>,
        prior: Option<Tensor<2>>,
        query: Query,
    ) -> Tensor<2> {
        let e = self.config.routing.n_experts;
        let device = h.device();
        let layer =
            Tensor::<2, Int>::from_data(TensorData::new(vec![query.known as i64], [1, 1]), &device);
        let layer_vec = self
            .query_layer
            .forward(layer)
            .reshape([1, self.config.d_model]);
        let u = h + prefix + layer_vec;
        let u = u.clone()
            + self
                .head_out
                .forward(silu(self.head_in.forward(layer_norm(&self.head_norm, u))));
        let u = layer_norm(&self.out_norm, u);
        let cols = query.known * e..(query.known + query.horizon) * e;
        let w = self
            .output
            .weight
            .val()
            .slice([0..self.config.d_model, cols.clone()]);
        let mut out = u.matmul(w);
        if let Some(b) = &self.output.bias {
            out = out + b.val().slice([cols]).unsqueeze_dim(0);
        }
        if let (Some(scale), Some(prior)) = (&self.prior_scale, prior) {
            let s = scale
                .val()
                .narrow(0, query.known, query.horizon)
                .reshape([1, query.horizon, 1])
                .expand([1, query.horizon, e])
                .reshape([1, query.horizon * e]);
            out = out + prior * s;
        }
        out
    }
}

/// `layer` (dropout) in training, with its mask drawn on the host from `seed`, when
/// given: a data-parallel step's shards then draw the same masks whatever order their
/// threads run in (Burn's `Dropout` draws from the device's one generator, shared by
/// the threads). Without a seed, `layer.forward`.
pub fn dropout<const D: usize>(layer: &Dropout, x: Tensor<D>, seed: Option<u64>) -> Tensor<D> {
    let Some(seed) = seed else {
        return layer.forward(x);
    };
    if layer.prob <= 0.0 || !x.device().is_autodiff() {
        return x;
    }
    let keep = 1.0 - layer.prob;
    // Element `i` is kept when the top 53 bits of `mix(seed, i)` fall below `keep`.
    let threshold = (keep * (1u64 << 53) as f64) as u64;
    let scale = (1.0 / keep) as f32;
    let shape = x.shape();
    let mask: Vec<f32> = (0..shape.num_elements() as u64)
        .map(|i| {
            if mix(seed, i) >> 11 < threshold {
                scale
            } else {
                0.0
            }
        })
        .collect();
    let device = x.device();
    x * Tensor::from_data(TensorData::new(mask, shape), &device)
}

/// A seed derived from `seed` for use `site` (SplitMix64's finaliser).
pub fn mix(seed: u64, site: u64) -> u64 {
    let mut z = seed ^ site.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
