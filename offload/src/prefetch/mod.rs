//! Prefetch plans (see [`crate::simulate::PrefetchPlan`]) from the prefetchers users
//! compare. Each builder uses only what exists at the moment its prefetch is issued,
//! except the oracle, which reads the future on purpose: it is the limit at the same lead.
//!
//! - `oracle`: the true experts, `D` layers ahead (counting on into the next token;
//!   `moecast simulate` reports the fastest of the leads `1..=D`);
//! - `previous`: at a token's start, every layer's experts of the previous token;
//! - `token`: the token table (per token id, each layer's most frequent experts in the
//!   training traces): at a token's start (its id is known) layers `0..D`, then after
//!   layer `l` layer `l+D`, so every layer is asked for `D` layers ahead;
//! - `coactivation`: after layer `l`, the experts of layers `l+1..l+D` that most often
//!   co-occurred with layer `l`'s choice (counts fitted on training traces);
//! - `blend`: after layer `l`, layers `l+1..l+D` by an online logistic blend of
//!   co-activation counts, the last two tokens' experts and the request's use, learned
//!   while decoding (see [`blend`]);
//! - `activation`: MoE-Infinity-like, activation-aware: after layer `l`, the experts of
//!   layers `l+1..l+D` this request has used most so far (counts decayed per token);
//! - `gate`: the cross-layer gate: after layer `l`, the model's gates of layers
//!   `l+1..l+D` applied to layer `l`'s router input (traces with router inputs);
//! - `pre-attention`: at layer `l`'s start, before its attention, layer `l`'s gate
//!   applied to the layer's input (the model replays the trace's token ids);
//! - `lens`: after a token's last MoE layer, the next token's layer-0 experts from the
//!   model's LM head read at that layer's router input (the logit lens, see
//!   [`crate::gate::NextTokenGate`]), before the next token is sampled;
//! - `learned`: the trained predictor: at a token's start (its id is known) every layer
//!   (a lookahead predictor: layer 0); for lookahead predictors also after each layer,
//!   layers `l+1..l+D`; for predictors trained with token-id dropout also after a
//!   token's last layer, the next token's layer 0 before its id is sampled.

use datasets::TraceView;
use predictor::baselines::BaselineStats;
use predictor::{OnlinePredictor, Task};

use crate::gate::NextTokenGate;
use crate::simulate::PrefetchPlan;

mod blend;
pub use blend::{blend, OnlineBlend};

/// Which prefetcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefetchKind {
    None,
    Oracle,
    Previous,
    Token,
    Coactivation,
    Blend,
    Activation,
    Gate,
    PreAttention,
    Lens,
    Learned,
}

impl PrefetchKind {
    /// All kinds, in report order.
    pub const ALL: [PrefetchKind; 11] = [
        PrefetchKind::None,
        PrefetchKind::Previous,
        PrefetchKind::Token,
        PrefetchKind::Coactivation,
        PrefetchKind::Blend,
        PrefetchKind::Activation,
        PrefetchKind::Gate,
        PrefetchKind::PreAttention,
        PrefetchKind::Lens,
        PrefetchKind::Learned,
        PrefetchKind::Oracle,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PrefetchKind::None => "none",
            PrefetchKind::Oracle => "oracle",
            PrefetchKind::Previous => "previous",
            PrefetchKind::Token => "token",
            PrefetchKind::Coactivation => "coactivation",
            PrefetchKind::Blend => "blend",
            PrefetchKind::Activation => "activation",
            PrefetchKind::Gate => "gate",
            PrefetchKind::PreAttention => "pre-attention",
            PrefetchKind::Lens => "lens",
            PrefetchKind::Learned => "learned",
        }
    }
}

impl std::str::FromStr for PrefetchKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        PrefetchKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown prefetcher '{s}' (none, previous, token, coactivation, blend, activation, gate, pre-attention, lens, learned, oracle)")
            })
    }
}

fn push_layer(out: &mut Vec<u32>, layer: usize, e: usize, experts: &[u16]) {
    out.extend(experts.iter().map(|&x| (layer * e + x as usize) as u32));
}

/// The oracle: the true experts, read `horizon` layers ahead (the layer `horizon`
/// positions later in the sequence, counting on into the next token; those within
/// `horizon` of a sequence's start at its first token's start). Forecasters get the
/// same lead: one layer ahead the oracle can be slower than a forecaster reading three.
/// The lead is at most one token (`n_moe` layers).
pub fn oracle(
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    horizon: usize,
) -> PrefetchPlan {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    // At most one token ahead: the simulator's deadlines look no further.
    let horizon = horizon.clamp(1, m);
    let mut plan = PrefetchPlan::empty("oracle", view.n_tokens(), m);
    for r in seqs {
        for t in r.clone() {
            for layer in 0..m {
                if let Some(ids) = view.layer(t, layer) {
                    let at = match ((t - r.start) * m + layer).checked_sub(horizon) {
                        None => plan.at_mut(r.start, 0),
                        // After that position's layer has routed.
                        Some(p) => plan.at_mut(r.start + p / m, p % m + 1),
                    };
                    push_layer(at, layer, e, ids);
                }
            }
        }
    }
    plan
}

/// Previous-token reuse: at a token's start, every layer's experts of the token before.
pub fn previous(view: &TraceView<'_>, seqs: &[std::ops::Range<usize>]) -> PrefetchPlan {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let mut plan = PrefetchPlan::empty("previous", view.n_tokens(), m);
    for r in seqs {
        for t in r.start + 1..r.end {
            let out = plan.at_mut(t, 0);
            for l in 0..m {
                if let Some(ids) = view.layer(t - 1, l) {
                    push_layer(out, l, e, ids);
                }
            }
        }
    }
    plan
}

/// The token table: at a token's start layers `0..horizon`, after layer `l` layer
/// `l + horizon`; the top `budget` experts of the token id's counts (unknown ids: the
/// layer's frequency).
pub fn token(
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    stats: &BaselineStats,
    budget: usize,
    horizon: usize,
) -> PrefetchPlan {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let horizon = horizon.max(1);
    let mut plan = PrefetchPlan::empty("token", view.n_tokens(), m);
    let mut ranking = Vec::new();
    for r in seqs {
        for t in r.clone() {
            let id = (view.token[t] != datasets::UNKNOWN_TOKEN).then_some(view.token[t]);
            for layer in 0..m {
                stats.rank_token(layer, id, budget, &mut ranking);
                let slot = layer.saturating_sub(horizon - 1);
                push_layer(plan.at_mut(t, slot), layer, e, &ranking);
            }
        }
    }
    plan
}

/// Cross-layer co-activation: after layer `l`, the top `budget` experts of layers
/// `l+1..=l+horizon` given layer `l`'s choice.
pub fn coactivation(
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    stats: &BaselineStats,
    budget: usize,
    horizon: usize,
) -> PrefetchPlan {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let mut plan = PrefetchPlan::empty("coactivation", view.n_tokens(), m);
    let mut ranking = Vec::new();
    for r in seqs {
        for t in r.clone() {
            for l in 0..m {
                let Some(given) = view.layer(t, l) else {
                    continue;
                };
                for h in 1..=horizon.min(stats.horizon).min(m - 1 - l) {
                    stats.rank_coactivation(l, h, given, budget, &mut ranking);
                    push_layer(plan.at_mut(t, l + 1), l + h, e, &ranking);
                }
            }
        }
    }
    plan
}

/// Activation-aware (MoE-Infinity-like): after layer `l` (and at a token's start for the
/// first layers), the experts of the coming layers this request has used most, with
/// counts decayed by `decay` per token.
pub fn activation(
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    budget: usize,
    horizon: usize,
    decay: f32,
) -> PrefetchPlan {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let mut plan = PrefetchPlan::empty("activation", view.n_tokens(), m);
    let mut counts = vec![0f32; m * e];
    let mut ranking = Vec::new();
    for r in seqs {
        counts.iter_mut().for_each(|c| *c = 0.0);
        for t in r.clone() {
            for slot in 0..=m {
                if slot > 0 {
                    if let Some(ids) = view.layer(t, slot - 1) {
                        for &x in ids {
                            counts[(slot - 1) * e + x as usize] += 1.0;
                        }
                    }
                }
                let first = if slot == 0 { 0 } else { slot };
                for layer in first..(slot + horizon).min(m) {
                    let row = &counts[layer * e..(layer + 1) * e];
                    if row.iter().all(|&c| c == 0.0) {
                        continue;
                    }
                    predictor::metrics::rank_top(row, budget, &mut ranking);
                    push_layer(plan.at_mut(t, slot), layer, e, &ranking);
                }
            }
            counts.iter_mut().for_each(|c| *c *= decay);
        }
    }
    plan
}

/// The cross-layer gate: after layer `l`, the top `budget` experts of layers
/// `l+1..=l+horizon` by `scores(target, x_l)` (the model's gate of `target` applied to
/// layer `l`'s router input, see [`crate::gate::GateForecaster`]).
pub fn gate(
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    scores: &dyn Fn(usize, &[f32]) -> Vec<f32>,
    budget: usize,
    horizon: usize,
) -> PrefetchPlan {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let mut plan = PrefetchPlan::empty("gate", view.n_tokens(), m);
    let mut ranking = Vec::new();
    for r in seqs {
        for t in r.clone() {
            for l in 0..m {
                let Some(x) = view.router_input_f32(t, l) else {
                    continue;
                };
                for target in l + 1..(l + 1 + horizon).min(m) {
                    predictor::metrics::rank_top(&scores(target, &x), budget, &mut ranking);
                    push_layer(plan.at_mut(t, l + 1), target, e, &ranking);
                }
            }
        }
    }
    plan
}

/// The pre-attention gate: at layer `l`'s start, before its attention, the top `budget`
/// experts of layer `l` by `logits` (`n_tokens x n_moe x n_experts`, NaN where unknown;
/// see [`crate::gate::pre_attention_logits`]).
pub fn pre_attention(
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    logits: &[f32],
    budget: usize,
) -> PrefetchPlan {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let mut plan = PrefetchPlan::empty("pre-attention", view.n_tokens(), m);
    let mut ranking = Vec::new();
    for r in seqs {
        for t in r.clone() {
            for l in 0..m {
                let row = &logits[(t * m + l) * e..(t * m + l + 1) * e];
                if row[0].is_nan() {
                    continue;
                }
                predictor::metrics::rank_top(row, budget, &mut ranking);
                push_layer(plan.before_attention_mut(t, l), l, e, &ranking);
            }
        }
    }
    plan
}

/// The logit-lens gate: after token `t`'s last MoE layer, the top `budget` experts of
/// token `t + 1`'s layer 0 by `gate`'s scores of `t`'s last router input.
pub fn lens(
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    gate: &NextTokenGate,
    budget: usize,
) -> PrefetchPlan {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let mut plan = PrefetchPlan::empty("lens", view.n_tokens(), m);
    let scores = gate.first_layer_before_id(view);
    let mut ranking = Vec::new();
    for r in seqs {
        for t in r.start + 1..r.end {
            let row = &scores[t * e..(t + 1) * e];
            if !row[0].is_nan() {
                predictor::metrics::rank_top(row, budget, &mut ranking);
                push_layer(plan.at_mut(t - 1, m), 0, e, &ranking);
            }
        }
    }
    plan
}

/// The learned predictor: next-token forecasts at a token's start (all layers; layer 0
/// only for lookahead predictors), and for lookahead predictors after each layer (layers
/// `l+1..l+D`, `D` at most `horizon`); with token-id dropout also the next token's
/// layer 0 after the last layer (id not yet sampled); `budget` experts per layer.
pub fn learned(
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    online: &mut OnlinePredictor,
    budget: usize,
    horizon: usize,
) -> Result<PrefetchPlan, predictor::PredictorError> {
    let m = view.meta.n_moe();
    let task = online.predictor().card.config.task;
    let before_id = online.predictor().card.config.token_dropout > 0.0;
    let mut plan = PrefetchPlan::empty("learned", view.n_tokens(), m);
    for r in seqs {
        online.reset();
        for t in r.clone() {
            let token = view.token[t];
            let f = online.predict_next(token)?;
            // A lookahead predictor forecasts layers 1.. again, better informed, after
            // the layers before them: at the token's start only layer 0 is worth a read.
            let upto = if task == Task::Lookahead { 1 } else { m };
            for l in 0..upto {
                push_forecast(&mut plan, t, 0, &f, l, budget);
            }
            let layers: Vec<Option<&[u16]>> = (0..m).map(|l| view.layer(t, l)).collect();
            if task == Task::Lookahead {
                for known in 1..m {
                    let given: Option<Vec<&[u16]>> = layers[..known].iter().copied().collect();
                    let Some(given) = given else { continue };
                    let x = view.router_input_f32(t, known - 1);
                    let f = online.predict_lookahead_with_input(token, &given, x.as_deref())?;
                    for l in f.first_layer..f.first_layer + f.n_layers().min(horizon) {
                        push_forecast(&mut plan, t, known, &f, l, budget);
                    }
                }
            }
            online.observe(token, &layers)?;
            if before_id && t + 1 < r.end {
                let f = online.predict_next_unknown()?;
                push_forecast(&mut plan, t, m, &f, 0, budget);
            }
        }
    }
    Ok(plan)
}

/// The `budget` most likely experts of `layer` in `f`, with their probabilities, onto
/// token `t`'s list at `slot`.
fn push_forecast(
    plan: &mut PrefetchPlan,
    t: usize,
    slot: usize,
    f: &predictor::ExpertForecast,
    layer: usize,
    budget: usize,
) {
    let probs = f.layer(layer);
    let top = f.top(layer, budget);
    let ids: Vec<u32> = top
        .iter()
        .map(|&x| (layer * f.n_experts + x as usize) as u32)
        .collect();
    let ps: Vec<f32> = top.iter().map(|&x| probs[x as usize]).collect();
    plan.push_scored(t, slot, &ids, &ps);
}
