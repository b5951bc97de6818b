//! The online blend: cheap forecasts of the coming layers weighed by a logistic model
//! that learns while the model decodes, for models without a trained predictor.
//!
//! After layer `l` of a token routes, each expert `x` of each layer `T = l + h`
//! (`h = 1..=horizon`) is scored from features that exist at that moment:
//!
//! - the co-activation log-odds of `x` at `T` given layer `l`'s choice, and given layer
//!   `l - 1`'s choice two or more layers ahead (counts, see [`BaselineStats`]);
//! - whether the previous token, and the one before, used `x` at `T`;
//! - how much this request has used `x` at `T` (counts decayed per token);
//! - the log-odds of `x`'s share of layer `T`'s choices (with a negative weight it
//!   turns the two co-activation terms into a naive-Bayes combination: each conditional
//!   over the prior, counted once);
//! - a bias.
//!
//! One weight vector per distance `h`, starting as the co-activation forecast alone,
//! is fitted by online logistic regression: once a token's layers have routed, every
//! scored expert is a labelled example. Forecasts for a token use only weights fitted on
//! the tokens before it. The sigmoid of the score is the forecast probability the
//! planner calibrates. The counts start as the predictor's training traces', or, for a
//! trace replayed without one, the trace's own (in-sample, as for co-activation); each
//! token is added to them once it has routed, so they follow the text being decoded.

use datasets::TraceView;
use predictor::baselines::BaselineStats;
use predictor::token_table::log_odds;

use crate::simulate::PrefetchPlan;

const FEATURES: usize = 7;

/// Learning rate and per-token decay of the request's use counts (settled on the real
/// traces of `../shared`: gap closed within 3 points for learning rates 0.01-0.05 and
/// decays 0.7-0.9).
const LEARNING_RATE: f32 = 0.02;
const USE_DECAY: f32 = 0.9;

/// The online logistic blend's state: one weight vector per forecast distance.
#[derive(Debug, Clone)]
pub struct OnlineBlend {
    weights: Vec<[f32; FEATURES]>,
}

impl OnlineBlend {
    /// Weights for distances `1..=horizon`, starting as the co-activation forecast.
    pub fn new(horizon: usize) -> Self {
        let mut start = [0.0; FEATURES];
        start[0] = 1.0;
        OnlineBlend {
            weights: vec![start; horizon + 1],
        }
    }

    fn score(&self, h: usize, f: &[f32; FEATURES]) -> f32 {
        f.iter().zip(&self.weights[h]).map(|(a, b)| a * b).sum()
    }

    /// One step of logistic regression on an example at distance `h`.
    fn learn(&mut self, h: usize, f: &[f32; FEATURES], used: bool) {
        let g = sigmoid(self.score(h, f)) - used as u8 as f32;
        for (w, x) in self.weights[h].iter_mut().zip(f) {
            *w -= LEARNING_RATE * g * x;
        }
    }

    /// The weights learned for distance `h` (co-activation given layer `l`, given layer
    /// `l - 1`, previous token, the token before, request use, the expert's share, bias).
    pub fn weights(&self, h: usize) -> &[f32; FEATURES] {
        &self.weights[h]
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

fn used_by(set: Option<&[u16]>, x: usize) -> f32 {
    set.map_or(0.0, |s| s.contains(&(x as u16)) as u8 as f32)
}

/// The blend's plan: after layer `l`, the top `budget` experts of layers
/// `l+1..=l+horizon` by the online blend, with their probabilities. Returns the plan
/// and the blend as it ended (its weights say what it learned).
pub fn blend(
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    stats: &BaselineStats,
    budget: usize,
    horizon: usize,
) -> (PrefetchPlan, OnlineBlend) {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let horizon = horizon.min(stats.horizon).max(1);
    let mut model = OnlineBlend::new(horizon);
    let mut counts = stats.clone();
    let mut plan = PrefetchPlan::empty("blend", view.n_tokens(), m);
    let (mut near, mut far) = (vec![0f32; e], vec![0f32; e]);
    // Each layer's share log-odds by expert, from the counts as they stand at a token.
    let mut marginal = vec![0f32; m * e];
    let k = view.meta.top_k as f32;
    let mut request_use = vec![0f32; m * e];
    let mut examples: Vec<(usize, usize, u16, [f32; FEATURES])> = Vec::new();
    let mut scores: Vec<f32> = Vec::with_capacity(e);
    let mut ranking = Vec::with_capacity(e);
    for r in seqs {
        request_use.iter_mut().for_each(|c| *c = 0.0);
        for t in r.clone() {
            examples.clear();
            let before = |back: usize, layer: usize| {
                (t >= r.start + back)
                    .then(|| view.layer(t - back, layer))
                    .flatten()
            };
            for (l, row) in marginal.chunks_mut(e).enumerate() {
                for (v, f) in row.iter_mut().zip(counts.share(l)) {
                    *v = log_odds(k * f);
                }
            }
            for l in 0..m {
                let Some(given) = view.layer(t, l) else {
                    continue;
                };
                let earlier = l.checked_sub(1).and_then(|p| view.layer(t, p));
                for h in 1..=horizon.min(m - 1 - l) {
                    let target = l + h;
                    counts.coactivation_log_odds(l, h, given, &mut near);
                    far.iter_mut().for_each(|v| *v = 0.0);
                    if let Some(g) = earlier.filter(|_| h < counts.horizon) {
                        counts.coactivation_log_odds(l - 1, h + 1, g, &mut far);
                    }
                    let (prev, prev2) = (before(1, target), before(2, target));
                    scores.clear();
                    for x in 0..e {
                        let f = [
                            near[x],
                            far[x],
                            used_by(prev, x),
                            used_by(prev2, x),
                            request_use[target * e + x].ln_1p(),
                            marginal[target * e + x],
                            1.0,
                        ];
                        scores.push(model.score(h, &f));
                        examples.push((h, target, x as u16, f));
                    }
                    predictor::metrics::rank_top(&scores, budget, &mut ranking);
                    let ids: Vec<u32> = ranking
                        .iter()
                        .map(|&x| (target * e + x as usize) as u32)
                        .collect();
                    let ps: Vec<f32> = ranking
                        .iter()
                        .map(|&x| sigmoid(scores[x as usize]))
                        .collect();
                    plan.push_scored(t, l + 1, &ids, &ps);
                }
            }
            for (h, target, x, f) in &examples {
                if let Some(routed) = view.layer(t, *target) {
                    model.learn(*h, f, routed.contains(x));
                }
            }
            counts.add_tokens(view, t..t + 1);
            request_use.iter_mut().for_each(|c| *c *= USE_DECAY);
            for l in 0..m {
                for &x in view.layer(t, l).unwrap_or(&[]) {
                    request_use[l * e + x as usize] += 1.0;
                }
            }
        }
    }
    (plan, model)
}
