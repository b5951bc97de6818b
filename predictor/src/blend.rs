//! The online blend: cheap forecasts of the coming layers weighed by a logistic model
//! that learns while the model decodes, for models without a trained predictor.
//!
//! After layer `l` of a token routes, each expert `x` of each layer `h = 1..=horizon`
//! positions later is scored: layer `T = l + h` of this token, or, past the last MoE
//! layer, layer `T = l + h - n_moe` of the next token (its id is not needed, so the
//! next token's first layers are forecast while this one finishes). The features exist
//! at that moment:
//!
//! - the co-activation log-odds of `x` at `T` given layer `l`'s choice, and given layer
//!   `l - 1`'s choice two or more layers ahead (counts, see [`BaselineStats`]; zero for
//!   the next token's layers, which the counts do not pair across tokens);
//! - whether the previous token, and the one before, used `x` at `T` (for the next
//!   token's layers: this token and the one before);
//! - how much this request has used `x` at `T` (counts decayed per token);
//! - the log-odds of `x`'s share of layer `T`'s choices (with a negative weight it
//!   turns the two co-activation terms into a naive-Bayes combination: each conditional
//!   over the prior, counted once);
//! - a bias.
//!
//! One weight vector per distance `h` and per kind of target (this token's layers, the
//! next token's), starting as the co-activation forecast alone (the next token's: its
//! previous-token reuse and the expert's share), is fitted by online logistic
//! regression: once a token's layers have routed, every expert scored for them is a
//! labelled example. Forecasts for a token use only weights fitted on
//! the tokens before it. The sigmoid of the score is the forecast probability the
//! planner calibrates. The counts start as the predictor's training traces', or, for a
//! trace replayed without one, the trace's own (in-sample, as for co-activation); each
//! token is added to them once it has routed, so they follow the text being decoded.
//!
//! [`OnlineBlend`] is the forecaster itself, fed one layer at a time: the simulator's
//! blend plan replays a trace through it, the offloading engine runs it live (`moecast
//! run --blend`), and the C and Python bindings serve it to other runtimes.

use std::path::Path;

use crate::baselines::BaselineStats;
use crate::token_table::log_odds;
use crate::{PredictorDir, Result};

const FEATURES: usize = 7;

/// Learning rate and per-token decay of the request's use counts (settled on the real
/// traces of `../shared`: gap closed within 3 points for learning rates 0.01-0.05 and
/// decays 0.7-0.9).
const LEARNING_RATE: f32 = 0.02;
const USE_DECAY: f32 = 0.9;

/// An expert scored at some distance, remembered until its layer routes.
#[derive(Clone)]
struct Example {
    /// Index of the weight vector it was scored with.
    w: usize,
    /// Whether its layer is the next token's.
    next: bool,
    target: usize,
    expert: u16,
    features: [f32; FEATURES],
}

/// The online blend: its weights (one vector per forecast distance and kind of target),
/// the counts it reads, and the request's recent routing.
#[derive(Clone)]
pub struct OnlineBlend {
    /// This token's layers at distances `0..=horizon`, then the next token's.
    weights: Vec<[f32; FEATURES]>,
    horizon: usize,
    counts: BaselineStats,
    /// Each layer's share log-odds by expert, from the counts as they stand.
    marginal: Vec<f32>,
    /// The request's use of each expert, decayed per token.
    request_use: Vec<f32>,
    /// The last two tokens' experts per layer, newest first.
    history: [Vec<Option<Vec<u16>>>; 2],
    /// The current token's layers routed so far (given to `forecast`).
    current: Vec<Option<Vec<u16>>>,
    /// Experts scored during this token's forward (for it and for the next token),
    /// learned from once their token has routed.
    examples: Vec<Example>,
    /// Experts the previous token scored for this one.
    carried: Vec<Example>,
    near: Vec<f32>,
    far: Vec<f32>,
    /// One layer's scores and ranking, reused.
    scores: Vec<f32>,
    ranking: Vec<u16>,
}

impl std::fmt::Debug for OnlineBlend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnlineBlend")
            .field("horizon", &self.horizon)
            .field("weights", &self.weights)
            .finish_non_exhaustive()
    }
}

impl OnlineBlend {
    /// Layers ahead the engine's blend forecasts (`simulate` takes `--horizon`).
    pub const HORIZON: usize = 3;

    /// A blend over `counts` (they then take in every routed token), forecasting up to
    /// `horizon` layers ahead (at most the counts' horizon); its weights start as the
    /// co-activation forecast.
    pub fn new(counts: BaselineStats, horizon: usize) -> Self {
        let (m, e) = (counts.shape.n_moe, counts.shape.n_experts);
        let horizon = horizon.min(counts.horizon).max(1);
        // The blend reads co-activation and shares only: per-token-id counts would grow
        // with every id it is shown.
        let mut counts = counts;
        counts.token_table = None;
        counts.first_layer_by_token.clear();
        let mut this_token = [0.0; FEATURES];
        this_token[0] = 1.0;
        let mut next_token = [0.0; FEATURES];
        next_token[2] = 1.0;
        next_token[5] = 1.0;
        let weights = [vec![this_token; horizon + 1], vec![next_token; horizon + 1]].concat();
        let mut blend = OnlineBlend {
            weights,
            horizon,
            counts,
            marginal: vec![0.0; m * e],
            request_use: vec![0.0; m * e],
            history: [vec![None; m], vec![None; m]],
            current: vec![None; m],
            examples: Vec::new(),
            carried: Vec::new(),
            near: vec![0.0; e],
            far: vec![0.0; e],
            scores: Vec::with_capacity(e),
            ranking: Vec::with_capacity(e),
        };
        (0..m).for_each(|l| blend.refresh_marginal(l));
        blend
    }

    /// Layers forecast ahead of the last routed one.
    pub fn horizon(&self) -> usize {
        self.horizon
    }

    /// A new request: its use counts and recent tokens start empty; weights and counts
    /// stay.
    pub fn start_request(&mut self) {
        self.request_use.iter_mut().for_each(|c| *c = 0.0);
        self.history.iter_mut().flatten().for_each(|x| *x = None);
        self.current.iter_mut().for_each(|x| *x = None);
        self.examples.clear();
        self.carried.clear();
    }

    /// Layer `l` of the current token routed to `given` (`earlier`: the token's layer
    /// `l - 1`): calls `out(target, scores)` for each of the `horizon` layers after it,
    /// `scores` by expert (log-odds; [`OnlineBlend::probability`] of each is the
    /// forecast probability). `target` is a MoE layer: `l + h`, or, past the model's
    /// last MoE layer, the next token's layer `l + h - n_moe` (then `target <= l`).
    pub fn forecast(
        &mut self,
        l: usize,
        given: &[u16],
        earlier: Option<&[u16]>,
        mut out: impl FnMut(usize, &[f32]),
    ) {
        let (m, e) = (self.counts.shape.n_moe, self.counts.shape.n_experts);
        if l >= m {
            return;
        }
        if l == 0 {
            // A token's first forecast: those of a token that never finished routing (a
            // failed forward) are dropped.
            self.examples.clear();
            self.current.iter_mut().for_each(|x| *x = None);
        }
        self.current[l] = Some(given.to_vec());
        let mut scores = std::mem::take(&mut self.scores);
        for h in 1..=self.horizon.min(m) {
            let next = l + h >= m;
            let target = (l + h) % m;
            let w = h + next as usize * (self.horizon + 1);
            self.near.iter_mut().for_each(|v| *v = 0.0);
            self.far.iter_mut().for_each(|v| *v = 0.0);
            if !next {
                self.counts
                    .coactivation_log_odds(l, h, given, &mut self.near);
                if let Some(g) = earlier.filter(|_| h < self.counts.horizon && l > 0) {
                    self.counts
                        .coactivation_log_odds(l - 1, h + 1, g, &mut self.far);
                }
            }
            let (prev, prev2) = if next {
                (
                    self.current[target].as_deref(),
                    self.history[0][target].as_deref(),
                )
            } else {
                (
                    self.history[0][target].as_deref(),
                    self.history[1][target].as_deref(),
                )
            };
            scores.clear();
            for x in 0..e {
                let features = [
                    self.near[x],
                    self.far[x],
                    used_by(prev, x),
                    used_by(prev2, x),
                    self.request_use[target * e + x].ln_1p(),
                    self.marginal[target * e + x],
                    1.0,
                ];
                scores.push(self.score(w, &features));
                self.examples.push(Example {
                    w,
                    next,
                    target,
                    expert: x as u16,
                    features,
                });
            }
            out(target, &scores);
        }
        self.scores = scores;
    }

    /// [`OnlineBlend::forecast`] as flat rows, one per layer ahead: `ids[horizon * budget]`
    /// gets each layer's `budget` best experts by score, best first, and `probs` (if
    /// given, as long) their probabilities. Row `i` is layer `l + 1 + i`, or, past the
    /// last MoE layer, the next token's layer `l + 1 + i - n_moe`; rows beyond one token
    /// ahead (a horizon above the MoE layers) are 0xFFFF (and probability 0).
    pub fn forecast_top(
        &mut self,
        l: usize,
        given: &[u16],
        earlier: Option<&[u16]>,
        budget: usize,
        ids: &mut [u16],
        mut probs: Option<&mut [f32]>,
    ) {
        ids.fill(u16::MAX);
        if let Some(p) = probs.as_deref_mut() {
            p.fill(0.0);
        }
        let m = self.counts.shape.n_moe;
        let mut ranking = std::mem::take(&mut self.ranking);
        self.forecast(l, given, earlier, |target, scores| {
            crate::metrics::rank_top(scores, budget, &mut ranking);
            let ahead = if target > l { target } else { target + m };
            let row = (ahead - l - 1) * budget;
            for (i, &x) in ranking.iter().enumerate() {
                ids[row + i] = x;
                if let Some(p) = probs.as_deref_mut() {
                    p[row + i] = Self::probability(scores[x as usize]);
                }
            }
        });
        self.ranking = ranking;
    }

    /// The current token's routing is complete (`layers`: each MoE layer's experts,
    /// `None` where not known; entries beyond the model's layers are ignored): the blend
    /// learns from this token's forecasts (call [`OnlineBlend::forecast`] at most once per
    /// layer and token), and the counts, the request's use and the recent tokens take it
    /// in. The token's id is not read (the blend keeps no per-id counts).
    pub fn token_routed(&mut self, _token: u32, layers: &[Option<&[u16]>]) {
        let (m, e) = (self.counts.shape.n_moe, self.counts.shape.n_experts);
        let layers = &layers[..layers.len().min(m)];
        let routed = |l: usize| layers.get(l).copied().flatten();
        let mut examples = std::mem::take(&mut self.examples);
        let carried = std::mem::take(&mut self.carried);
        for ex in carried.iter().chain(examples.iter().filter(|x| !x.next)) {
            if let Some(ids) = routed(ex.target) {
                self.learn(ex.w, &ex.features, ids.contains(&ex.expert));
            }
        }
        // The next token's examples wait for its routing.
        self.carried = carried;
        self.carried.clear();
        self.carried.extend(examples.drain(..).filter(|x| x.next));
        self.examples = examples;
        self.current.iter_mut().for_each(|x| *x = None);
        self.counts.add_routing(datasets::UNKNOWN_TOKEN, layers);
        for l in (0..layers.len()).filter(|&l| layers[l].is_some()) {
            self.refresh_marginal(l);
        }
        self.request_use.iter_mut().for_each(|c| *c *= USE_DECAY);
        for (l, ids) in layers.iter().enumerate() {
            for &x in ids.unwrap_or(&[]) {
                self.request_use[l * e + x as usize] += 1.0;
            }
        }
        self.history.swap(0, 1);
        for (l, slot) in self.history[0].iter_mut().enumerate() {
            match (slot.as_mut(), routed(l)) {
                (Some(v), Some(ids)) => {
                    v.clear();
                    v.extend_from_slice(ids);
                }
                (_, ids) => *slot = ids.map(<[u16]>::to_vec),
            }
        }
    }

    /// Layer `l`'s share log-odds, from the counts as they stand.
    fn refresh_marginal(&mut self, l: usize) {
        let e = self.counts.shape.n_experts;
        let k = self.counts.shape.top_k as f32;
        for (v, f) in self.marginal[l * e..(l + 1) * e]
            .iter_mut()
            .zip(self.counts.share(l))
        {
            *v = log_odds(k * f);
        }
    }

    fn score(&self, w: usize, f: &[f32; FEATURES]) -> f32 {
        f.iter().zip(&self.weights[w]).map(|(a, b)| a * b).sum()
    }

    /// One step of logistic regression on an example scored with weight vector `v`.
    fn learn(&mut self, v: usize, f: &[f32; FEATURES], used: bool) {
        let g = Self::probability(self.score(v, f)) - used as u8 as f32;
        for (w, x) in self.weights[v].iter_mut().zip(f) {
            *w -= LEARNING_RATE * g * x;
        }
    }

    /// The forecast probability of a score (its sigmoid).
    pub fn probability(score: f32) -> f32 {
        1.0 / (1.0 + (-score).exp())
    }

    /// The weights learned for distance `h` (co-activation given layer `l`, given layer
    /// `l - 1`, previous token, the token before, request use, the expert's share, bias)
    /// for this token's layers, or (`next_token`) for the next token's.
    pub fn weights(&self, h: usize, next_token: bool) -> &[f32; FEATURES] {
        &self.weights[h + next_token as usize * (self.horizon + 1)]
    }
}

fn used_by(set: Option<&[u16]>, x: usize) -> f32 {
    set.map_or(0.0, |s| s.contains(&(x as u16)) as u8 as f32)
}

/// The counts that start a blend: those stored beside the predictor in directory
/// `path`, or counts fitted on every sequence of the trace `path` (any storage form;
/// one of more than `max_moe_layers` MoE layers is counted over its first ones), with
/// co-activation up to [`OnlineBlend::HORIZON`] layers ahead.
pub fn load_counts(path: &Path, max_moe_layers: usize) -> Result<BaselineStats> {
    if path.is_dir() {
        return PredictorDir::new(path.to_path_buf()).read_counts();
    }
    let opened = datasets::open_trace(path)?;
    let view = opened.view();
    let mut shape = datasets::examples::RoutingShape::of(view.meta);
    shape.n_moe = shape.n_moe.min(max_moe_layers.max(1));
    let horizon = OnlineBlend::HORIZON
        .min(shape.n_moe.saturating_sub(1))
        .max(1);
    let mut counts = BaselineStats::new(shape, horizon);
    for r in view.sequence_ranges() {
        counts.add_tokens(&view, r);
    }
    Ok(counts)
}
