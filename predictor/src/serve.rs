//! Online prediction inside a runtime: load once, then per token
//!
//! 1. `predict_next(token)` once the token is sampled: every layer's experts, before
//!    the model runs it (its id and all earlier routing are the inputs);
//! 2. `predict_lookahead(known)` while it runs: layers after the `known` ones;
//! 3. `observe(token, routing)` when its routing is complete;
//! 4. `predict_next_unknown()` before the next token is sampled (predictors trained
//!    with token-id dropout).
//!
//! Each token costs one backbone step with cached keys and values (a sliding window of
//! `context` tokens), run when a forecast first needs it: a runtime that forecasts only
//! some tokens (the engine's prefetch guard switches forecasting off where it does not
//! pay) observes the others for free. Up to [`SEQUENTIAL_CATCH_UP`] tokens observed
//! without a forecast (and no more than `context`) are encoded one by one at the next
//! forecast, exactly as if each had been encoded when observed; more are encoded as one
//! batch over the last `context` tokens, the window starting afresh (as the predictor
//! was trained).

use std::collections::VecDeque;

use burn::tensor::{Int, Tensor, TensorData};
use datasets::examples::token_bucket;

use crate::card::LoadedPredictor;
use crate::config::{Query, Task};
use crate::error::{PredictorError, Result};
use crate::metrics::rank_top;
use crate::model::BlockCache;

/// Predicted probabilities for a run of consecutive MoE layers.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertForecast {
    /// First MoE layer covered.
    pub first_layer: usize,
    pub n_experts: usize,
    pub top_k: usize,
    /// `[layers, n_experts]` probabilities (sigmoid of the logits).
    pub probs: Vec<f32>,
}

impl ExpertForecast {
    /// Layers covered.
    pub fn n_layers(&self) -> usize {
        self.probs.len() / self.n_experts
    }

    /// Probabilities of MoE layer `layer` (absolute index).
    pub fn layer(&self, layer: usize) -> &[f32] {
        let i = layer - self.first_layer;
        &self.probs[i * self.n_experts..(i + 1) * self.n_experts]
    }

    /// The `n` most likely experts of `layer`, best first.
    pub fn top(&self, layer: usize, n: usize) -> Vec<u16> {
        let mut out = Vec::new();
        rank_top(self.layer(layer), n, &mut out);
        out
    }

    /// The `n` most likely experts of each of `rows` layers from the first covered,
    /// flat and best first; rows past the covered layers are `u16::MAX` (what the C and
    /// Python bindings return).
    pub fn top_rows(&self, n: usize, rows: usize) -> Vec<u16> {
        let mut out = vec![u16::MAX; rows * n];
        let layers = self.first_layer..self.first_layer + self.n_layers().min(rows);
        for (i, layer) in layers.enumerate() {
            out[i * n..(i + 1) * n].copy_from_slice(&self.top(layer, n));
        }
        out
    }
}

/// Tokens observed without a forecast that are encoded one by one at the next forecast;
/// more are encoded as one window from scratch.
pub const SEQUENTIAL_CATCH_UP: usize = 8;

/// A predictor with incremental state for one sequence.
pub struct OnlinePredictor {
    p: LoadedPredictor,
    caches: Vec<BlockCache>,
    /// Multi-hot routing of the last observed token (zeros at sequence start).
    prev_routing: Vec<f32>,
    /// Backbone output for the token being processed, and its id.
    current: Option<(u32, Tensor<2>)>,
    /// Backbone inputs of the last `context` positions (token bucket, the previous
    /// token's multi-hot routing), oldest first.
    recent: VecDeque<(i64, Vec<f32>)>,
    /// Positions observed since the last encoding (the newest of `recent`, or more than it
    /// holds when the window slid past some).
    pending: usize,
}

impl OnlinePredictor {
    /// Wraps a loaded predictor; starts an empty sequence.
    pub fn new(p: LoadedPredictor) -> Self {
        let caches = p.model.empty_caches(&p.device);
        let width = p.card.config.routing.width();
        OnlinePredictor {
            p,
            caches,
            prev_routing: vec![0.0; width],
            current: None,
            recent: VecDeque::new(),
            pending: 0,
        }
    }

    /// The loaded predictor.
    pub fn predictor(&self) -> &LoadedPredictor {
        &self.p
    }

    /// Starts a new sequence.
    pub fn reset(&mut self) {
        self.caches = self.p.model.empty_caches(&self.p.device);
        self.prev_routing.iter_mut().for_each(|x| *x = 0.0);
        self.current = None;
        self.recent.clear();
        self.pending = 0;
    }

    /// Remembers the inputs of a new position (`pending`: not encoded yet).
    fn remember(&mut self, bucket: i64, pending: bool) {
        self.recent.push_back((bucket, self.prev_routing.clone()));
        if self.recent.len() > self.p.card.config.context {
            self.recent.pop_front();
        }
        self.pending = self.pending.saturating_add(pending as usize);
    }

    /// Encodes the positions observed since the last forecast.
    fn catch_up(&mut self) {
        if self.pending == 0 {
            return;
        }
        let mut caches = std::mem::take(&mut self.caches);
        // More pending than `recent` holds: the oldest inputs are gone, start afresh.
        if self.pending > SEQUENTIAL_CATCH_UP || self.pending > self.recent.len() {
            caches = self.p.model.empty_caches(&self.p.device);
            let buckets = self.recent.iter().map(|(b, _)| *b).collect();
            let rows = self.recent.iter().flat_map(|(_, r)| r.iter().copied());
            self.encode(buckets, rows.collect(), &mut caches);
        } else {
            for (b, r) in self.recent.range(self.recent.len() - self.pending..) {
                self.encode(vec![*b], r.clone(), &mut caches);
            }
        }
        self.caches = caches;
        self.pending = 0;
    }

    /// The backbone output of `token` when it is the position encoded last.
    fn encoded(&self, token: u32) -> Option<&Tensor<2>> {
        self.current
            .as_ref()
            .filter(|(t, _)| *t == token)
            .map(|(_, h)| h)
    }

    /// Runs the backbone for `token` (once per token).
    fn step(&mut self, token: u32) -> Tensor<2> {
        if let Some(h) = self.encoded(token) {
            return h.clone();
        }
        self.catch_up();
        let bucket = token_bucket(token, self.p.card.config.token_buckets);
        let mut caches = std::mem::take(&mut self.caches);
        let h = self.encode(vec![bucket], self.prev_routing.clone(), &mut caches);
        self.caches = caches;
        self.remember(bucket, false);
        self.current = Some((token, h.clone()));
        h
    }

    /// The backbone output `[1, d]` of the last of the positions with token buckets
    /// `buckets` and previous-token routing `rows` (`[positions, width]`, flat) after
    /// the cached ones, appending their keys and values to `caches`.
    fn encode(&self, buckets: Vec<i64>, rows: Vec<f32>, caches: &mut [BlockCache]) -> Tensor<2> {
        let cfg = &self.p.card.config;
        let dev = &self.p.device;
        let s = buckets.len();
        let tok = Tensor::<2, Int>::from_data(TensorData::new(buckets, [1, s]), dev);
        let prev = Tensor::<3>::from_data(TensorData::new(rows, [1, s, cfg.routing.width()]), dev);
        self.p
            .model
            .encode_step(tok, prev, caches)
            .narrow(1, s - 1, 1)
            .reshape([1, cfg.d_model])
    }

    fn run_query(
        &mut self,
        token: u32,
        known: &[&[u16]],
        router_input: Option<&[f32]>,
        query: Query,
    ) -> Result<ExpertForecast> {
        let h = self.step(token);
        self.forecast(Some(token), h, known, router_input, query)
    }

    /// The count prior of `query` for the token `token` (`None`: id not known yet) whose
    /// layers `known` are routed, when the predictor has the prior path.
    fn prior(
        &self,
        token: Option<u32>,
        known: &[&[u16]],
        query: Query,
    ) -> Result<Option<Tensor<2>>> {
        let cfg = &self.p.card.config;
        if !cfg.token_prior {
            return Ok(None);
        }
        let stats = self.p.baselines.as_ref().ok_or_else(|| {
            PredictorError::Invalid(
                "this predictor adds the token table's prior: its baselines.safetensors is missing"
                    .into(),
            )
        })?;
        let e = cfg.routing.n_experts;
        let layers: Vec<Option<&[u16]>> = known.iter().map(|x| Some(*x)).collect();
        let mut out = vec![0f32; query.horizon * e];
        let token = token.filter(|&t| t != datasets::UNKNOWN_TOKEN);
        crate::prior::query_prior(stats, token, &layers, query, false, &mut out);
        Ok(Some(Tensor::from_data(
            TensorData::new(out, [1, query.horizon * e]),
            &self.p.device,
        )))
    }

    /// Reads `query` off the backbone output `h` of the token being forecast.
    fn forecast(
        &self,
        token: Option<u32>,
        h: Tensor<2>,
        known: &[&[u16]],
        router_input: Option<&[f32]>,
        query: Query,
    ) -> Result<ExpertForecast> {
        let r = self.p.card.config.routing;
        let dev = &self.p.device;
        let mut row = vec![0f32; r.width()];
        for (l, ids) in known.iter().enumerate() {
            for &e in ids.iter() {
                if e as usize >= r.n_experts {
                    return Err(PredictorError::Invalid(format!(
                        "expert {e} at layer {l} is out of range (n_experts = {})",
                        r.n_experts
                    )));
                }
                row[l * r.n_experts + e as usize] = 1.0;
            }
        }
        let ids = self
            .p
            .model
            .known_prefix(Tensor::from_data(TensorData::new(row, [1, r.width()]), dev))
            .narrow(0, query.known, 1)
            .reshape([1, self.p.card.config.d_model]);
        let x = router_input
            .map(|x| Tensor::<2>::from_data(TensorData::new(x.to_vec(), [1, x.len()]), dev));
        let prefix = self.p.model.query_prefix(ids, x, query);
        let prior = self.prior(token, known, query)?;
        let logits = self.p.model.query_logits(h, prefix, prior, query);
        let probs = burn::tensor::activation::sigmoid(logits)
            .try_into_vec_as::<f32>()
            .map_err(|e| PredictorError::Invalid(format!("reading predictions: {e:?}")))?;
        Ok(ExpertForecast {
            first_layer: query.known,
            n_experts: r.n_experts,
            top_k: r.top_k,
            probs,
        })
    }

    /// Every MoE layer of the next token, whose id is `token` (both tasks train this
    /// query).
    pub fn predict_next(&mut self, token: u32) -> Result<ExpertForecast> {
        let cfg = &self.p.card.config;
        let q = Query {
            known: 0,
            horizon: cfg.routing.n_moe,
        };
        self.run_query(token, &[], None, q)
    }

    /// Every MoE layer of the token after the last observed one, before its id is
    /// sampled (the unknown embedding row stands in for it; nothing is cached, so the
    /// real id is read by [`OnlinePredictor::predict_next`] as usual). Meaningful for
    /// predictors trained with token-id dropout
    /// ([`crate::config::PredictorConfig::token_dropout`]).
    pub fn predict_next_unknown(&mut self) -> Result<ExpertForecast> {
        let cfg = &self.p.card.config;
        if cfg.token_dropout <= 0.0 {
            return Err(PredictorError::Invalid(
                "this predictor was trained without --token-dropout: it cannot forecast a token before its id".into(),
            ));
        }
        let n_moe = cfg.routing.n_moe;
        let bucket = token_bucket(datasets::UNKNOWN_TOKEN, cfg.token_buckets);
        self.catch_up();
        let mut caches = self.caches.clone();
        let h = self.encode(vec![bucket], self.prev_routing.clone(), &mut caches);
        let q = Query {
            known: 0,
            horizon: n_moe,
        };
        self.forecast(None, h, &[], None, q)
    }

    /// Layers after `known` (the current token's routing of layers `0..known.len()`)
    /// for the token `token`. Lookahead predictors.
    pub fn predict_lookahead(&mut self, token: u32, known: &[&[u16]]) -> Result<ExpertForecast> {
        self.predict_lookahead_with_input(token, known, None)
    }

    /// [`OnlinePredictor::predict_lookahead`] given also the last known layer's router
    /// input (required by predictors trained with hidden-state features).
    pub fn predict_lookahead_with_input(
        &mut self,
        token: u32,
        known: &[&[u16]],
        router_input: Option<&[f32]>,
    ) -> Result<ExpertForecast> {
        let cfg = &self.p.card.config;
        if cfg.features.hidden() {
            match router_input {
                Some(x) if x.len() == cfg.router_input_dim => {}
                Some(x) => {
                    return Err(PredictorError::Invalid(format!(
                        "router input has {} values, the predictor reads {}",
                        x.len(),
                        cfg.router_input_dim
                    )))
                }
                None => {
                    return Err(PredictorError::Invalid(format!(
                        "this predictor reads router inputs (--features {}): pass the last known layer's",
                        cfg.features.as_str()
                    )))
                }
            }
        }
        if cfg.task != Task::Lookahead {
            return Err(PredictorError::Invalid(format!(
                "this predictor was trained for {}, not lookahead",
                cfg.task.as_str()
            )));
        }
        let n_moe = cfg.routing.n_moe;
        if known.is_empty() || known.len() >= n_moe {
            return Err(PredictorError::Invalid(format!(
                "lookahead needs 1..{} known layers, got {}",
                n_moe - 1,
                known.len()
            )));
        }
        let q = Query {
            known: known.len(),
            horizon: cfg.horizon.min(n_moe - known.len()),
        };
        let x = router_input.filter(|_| cfg.features.hidden());
        self.run_query(token, known, x, q)
    }

    /// Records the completed token `token` with its routing (per MoE layer, `None`
    /// when not computed); the next prediction conditions on it.
    pub fn observe(&mut self, token: u32, routing: &[Option<&[u16]>]) -> Result<()> {
        let r = self.p.card.config.routing;
        if routing.len() != r.n_moe {
            return Err(PredictorError::Invalid(format!(
                "routing has {} layers, the predictor expects {}",
                routing.len(),
                r.n_moe
            )));
        }
        if self.encoded(token).is_none() {
            let bucket = token_bucket(token, self.p.card.config.token_buckets);
            self.remember(bucket, true);
        }
        self.current = None;
        self.prev_routing.iter_mut().for_each(|x| *x = 0.0);
        for (l, ids) in routing.iter().enumerate() {
            for &e in ids.iter().flat_map(|x| x.iter()) {
                if e as usize >= r.n_experts {
                    return Err(PredictorError::Invalid(format!(
                        "expert {e} at layer {l} is out of range (n_experts = {})",
                        r.n_experts
                    )));
                }
                self.prev_routing[l * r.n_experts + e as usize] = 1.0;
            }
        }
        Ok(())
    }
}
