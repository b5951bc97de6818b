//! Evaluation of a predictor and the baselines on the same (token, layer) targets.

use std::sync::Arc;

use burn::tensor::Device;
use datasets::examples::{ExampleSet, Split, Window};
use indicatif::{ProgressBar, ProgressStyle};

use crate::baselines::BaselineStats;
use crate::batch::BatchTensors;
use crate::config::{Query, Task};
use crate::error::{PredictorError, Result};
use crate::metrics::{rank_top, CalibrationCounts, LayerCounts};
use crate::model::ExpertPredictor;
pub use crate::report::{plot_f1, render_table, EvalReport, GroupReport, MethodReport};

/// Selection scores of MoE layer `target`'s experts given a router input.
pub type GateScores = dyn Fn(usize, &[f32]) -> Vec<f32> + Send + Sync;

/// A training-free forecaster that reads router inputs: `scores(target, x)` ranks MoE
/// layer `target`'s experts given the router input `x` of an earlier layer of the same
/// token (the model's own gate of `target` applied to `x`: the cross-layer gate).
#[derive(Clone)]
pub struct GateBaseline {
    pub name: String,
    pub scores: Arc<GateScores>,
}

impl std::fmt::Debug for GateBaseline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateBaseline")
            .field("name", &self.name)
            .finish()
    }
}

/// Precomputed forecasts from outside the predictor, per trace of the set, NaN where
/// absent: a layer's experts made one attention block early (the pre-attention gate,
/// `n_tokens x n_moe x n_experts` scores, scored on the `+1 layer` group), or each
/// token's first MoE layer made before its id (the logit lens, `n_tokens x n_experts`,
/// scored on the `next token, before its id` group).
#[derive(Debug, Clone)]
pub struct EarlyScores {
    pub name: String,
    pub per_trace: Vec<Vec<f32>>,
}

/// Options of [`evaluate`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Windows per forward pass.
    pub batch_size: usize,
    /// Prefetch budget for recall@B (default `2k`).
    pub budget: Option<usize>,
    /// Also score the baselines.
    pub baselines: bool,
    /// Also score a gate-based baseline on the lookahead groups (needs traces with router
    /// inputs): the forecast of layer `l + h` reads the last known layer's router input.
    pub gate: Option<GateBaseline>,
    /// Also score one-block-early forecasts (the pre-attention gate) on `+1 layer`.
    pub early: Option<EarlyScores>,
    /// Also score forecasts of the first MoE layer before the token's id (the logit
    /// lens, with and without observed counts) on the `next token, before its id` group
    /// (predictors trained with token-id dropout, which have that group).
    pub before_id: Vec<EarlyScores>,
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            batch_size: 16,
            budget: None,
            baselines: true,
            gate: None,
            early: None,
            before_id: Vec::new(),
            progress: false,
        }
    }
}

/// Forecast groups: `next token` (the query with no layer known, which lookahead
/// predictors are also trained on), then for lookahead the `hh`-th predicted layer.
fn group_names(task: Task, horizon: usize, n_moe: usize) -> Vec<String> {
    let mut g = vec!["next token".to_string()];
    if task == Task::Lookahead {
        g.extend((1..=horizon.min(n_moe - 1)).map(|h| format!("+{h} layer")));
    }
    g
}

/// Evaluates `model` (and the baselines fitted in `stats`) on the `split` sequences of
/// `set`.
pub fn evaluate(
    model: &ExpertPredictor,
    stats: Option<&BaselineStats>,
    set: &ExampleSet,
    split: Split,
    device: &Device,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let cfg = &model.config;
    let shape = cfg.routing;
    let (m, e, k) = (shape.n_moe, shape.n_experts, shape.top_k);
    let budget = opts.budget.unwrap_or(2 * k).clamp(k, e);
    let queries = cfg.training_queries();
    let groups = group_names(cfg.task, cfg.horizon, m);
    crate::train::check_router_inputs(cfg, set)?;
    let windows = set.windows(split, cfg.context);
    if windows.is_empty() {
        return Err(PredictorError::Invalid(format!(
            "no {split:?} sequences to evaluate"
        )));
    }
    let prior_stats = stats;
    let stats = stats.filter(|_| opts.baselines);
    let mut names = vec!["predictor".to_string()];
    let slots = stats.map(|st| StatSlots::register(st, cfg.task, &mut names));
    let gate = match &opts.gate {
        Some(g) if cfg.task == Task::Lookahead => {
            names.push(g.name.clone());
            Some((names.len() - 1, g))
        }
        _ => None,
    };
    let early = match &opts.early {
        Some(g) if cfg.task == Task::Lookahead => {
            names.push(g.name.clone());
            Some((names.len() - 1, g))
        }
        _ => None,
    };
    if cfg.token_dropout > 0.0 {
        names.extend(opts.before_id.iter().map(|g| g.name.clone()));
    }
    let mut counts: Vec<Vec<LayerCounts>> = names
        .iter()
        .map(|_| {
            groups
                .iter()
                .map(|_| LayerCounts::new(m, e, k, budget))
                .collect()
        })
        .collect();
    let mut calibration = vec![CalibrationCounts::default(); groups.len()];
    let bar = progress_bar(opts.progress, windows.len());
    let mut ranking = Vec::new();
    for chunk in windows.chunks(opts.batch_size.max(1)) {
        let batch = set.batch_with(
            chunk,
            cfg.token_buckets,
            cfg.features.hidden().then_some(cfg.router_input_dim),
        );
        let bt = BatchTensors::new(&batch, shape, device).with_priors(
            model,
            prior_stats,
            set,
            &batch,
            &queries,
            false,
        )?;
        let logits = model.forward_queries(&bt, &queries);
        for (q, z) in queries.iter().zip(logits) {
            let z: Vec<f32> = z
                .try_into_vec_as::<f32>()
                .map_err(|e| PredictorError::Invalid(format!("reading logits: {e:?}")))?;
            score_query(
                &z,
                *q,
                &batch,
                chunk,
                set,
                stats.zip(slots),
                GateMethods { gate, early },
                &mut counts,
                &mut calibration,
                &mut ranking,
                budget,
                m,
                e,
            );
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let mut methods: Vec<MethodReport> = names
        .into_iter()
        .zip(counts)
        .map(|(method, per_group)| MethodReport {
            method,
            groups: per_group.iter().map(group_report).collect(),
        })
        .collect();
    for (g, c) in methods[0].groups.iter_mut().zip(&calibration) {
        g.calibration = Some(c.summary());
    }
    let seqs: Vec<_> = set.split(split).collect();
    Ok(EvalReport {
        task: cfg.task,
        groups,
        budget,
        top_k: k,
        n_experts: e,
        traces: set.paths().to_vec(),
        split,
        sequences: seqs.len(),
        tokens: seqs.iter().map(|s| s.tokens.len()).sum(),
        methods,
    })
}

/// Name of the group [`score_before_id`] adds.
pub const BEFORE_ID_GROUP: &str = "next token, before its id";

/// Adds the group [`BEFORE_ID_GROUP`] to `report`: every layer of each token of the
/// `split` sequences (after the first), forecast by `online` after the previous token
/// and before the token's id ([`OnlinePredictor::predict_next_unknown`], predictors
/// trained with token-id dropout), streamed token by token as a runtime asks it, beside
/// the baselines that never read the id (previous-token reuse, frequency) and, if given
/// (and registered by [`evaluate`] through [`EvalOptions::before_id`]), the
/// `first_layer` forecasts of the first MoE layer.
pub fn score_before_id(
    report: &mut EvalReport,
    online: &mut crate::OnlinePredictor,
    set: &ExampleSet,
    split: Split,
    first_layer: &[EarlyScores],
) -> Result<()> {
    let shape = online.predictor().card.config.routing;
    let (m, e, k) = (shape.n_moe, shape.n_experts, shape.top_k);
    let stats = online.predictor().baselines.clone();
    let mut counts: Vec<LayerCounts> = report
        .methods
        .iter()
        .map(|_| LayerCounts::new(m, e, k, report.budget))
        .collect();
    let slot = |name: &str| report.methods.iter().position(|mr| mr.method == name);
    let (previous, frequency) = (slot("previous-token"), slot("frequency"));
    let lenses: Vec<(usize, &EarlyScores)> = first_layer
        .iter()
        .filter_map(|g| slot(&g.name).map(|i| (i, g)))
        .collect();
    let mut calibration = CalibrationCounts::default();
    let mut ranking = Vec::new();
    for seq in set.split(split) {
        let view = set.view(seq.trace);
        online.reset();
        for t in seq.tokens.clone() {
            let layers: Vec<Option<&[u16]>> = (0..m).map(|l| view.layer(t, l)).collect();
            if t > seq.tokens.start {
                for &(i, g) in &lenses {
                    let row = &g.per_trace[seq.trace][t * e..(t + 1) * e];
                    if let (Some(truth), false) = (layers[0], row[0].is_nan()) {
                        rank_top(row, report.budget, &mut ranking);
                        counts[i].add(0, &ranking, truth);
                    }
                }
                let f = online.predict_next_unknown()?;
                for (l, truth) in layers.iter().enumerate() {
                    let Some(truth) = truth else { continue };
                    rank_top(f.layer(l), report.budget, &mut ranking);
                    counts[0].add(l, &ranking, truth);
                    calibration.add(f.layer(l), truth);
                    let Some(st) = &stats else { continue };
                    if let Some(i) = previous {
                        st.rank_previous(l, view.layer(t - 1, l), report.budget, &mut ranking);
                        counts[i].add(l, &ranking, truth);
                    }
                    if let Some(i) = frequency {
                        st.rank_frequency(l, report.budget, &mut ranking);
                        counts[i].add(l, &ranking, truth);
                    }
                }
            }
            online.observe(view.token[t], &layers)?;
        }
    }
    report.groups.push(BEFORE_ID_GROUP.into());
    for (mr, c) in report.methods.iter_mut().zip(&counts) {
        mr.groups.push(group_report(c));
    }
    if let Some(g) = report.methods[0].groups.last_mut() {
        g.calibration = Some(calibration.summary());
    }
    Ok(())
}

/// Method slots of the count baselines.
#[derive(Clone, Copy)]
struct StatSlots {
    previous: usize,
    frequency: usize,
    coactivation: Option<usize>,
    token: Option<usize>,
    combined: Option<usize>,
}

impl StatSlots {
    /// Appends the count baselines' names to `names`: previous-token, frequency, then
    /// (lookahead) co-activation, then the token table (when the counts have one) and
    /// (lookahead) token + co-activation.
    fn register(st: &BaselineStats, task: Task, names: &mut Vec<String>) -> StatSlots {
        let mut add = |name: &str| {
            names.push(name.to_string());
            names.len() - 1
        };
        let lookahead = task == Task::Lookahead;
        let previous = add("previous-token");
        let frequency = add("frequency");
        let coactivation = lookahead.then(|| add("co-activation"));
        let token = st.has_token_table().then(|| add("token table"));
        let combined = (lookahead && st.has_token_table()).then(|| add("token + co-activation"));
        StatSlots {
            previous,
            frequency,
            coactivation,
            token,
            combined,
        }
    }
}

/// The gate baselines being scored, with their method slots.
#[derive(Clone, Copy)]
struct GateMethods<'a> {
    gate: Option<(usize, &'a GateBaseline)>,
    early: Option<(usize, &'a EarlyScores)>,
}

#[allow(clippy::too_many_arguments)]
fn score_query(
    z: &[f32],
    q: Query,
    batch: &datasets::examples::WindowBatch,
    windows: &[Window],
    set: &ExampleSet,
    stats: Option<(&BaselineStats, StatSlots)>,
    extra: GateMethods<'_>,
    counts: &mut [Vec<LayerCounts>],
    calibration: &mut [CalibrationCounts],
    ranking: &mut Vec<u16>,
    budget: usize,
    m: usize,
    e: usize,
) {
    let width = q.horizon * e;
    for (row, &t) in batch.token_index.iter().enumerate() {
        if t == usize::MAX {
            continue;
        }
        let view = set.view(windows[row / batch.len].trace);
        for hh in 0..q.horizon {
            let layer = q.known + hh;
            if batch.target_mask[row * m + layer] == 0.0 {
                continue;
            }
            let Some(truth) = view.layer(t, layer) else {
                continue;
            };
            let group = if q.known == 0 { 0 } else { hh + 1 };
            let logits = &z[row * width + hh * e..row * width + (hh + 1) * e];
            rank_top(logits, budget, ranking);
            let probs: Vec<f32> = logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
            calibration[group].add(&probs, truth);
            counts[0][group].add(layer, ranking, truth);
            if let (Some((gi, g)), true) = (extra.gate, q.known > 0) {
                if let Some(x) = view.router_input_f32(t, q.known - 1) {
                    rank_top(&(g.scores)(layer, &x), budget, ranking);
                    counts[gi][group].add(layer, ranking, truth);
                }
            }
            if let (Some((ei, es)), true) = (extra.early, q.known > 0 && hh == 0) {
                let scores =
                    &es.per_trace[windows[row / batch.len].trace][(t * m + layer) * e..][..e];
                if !scores[0].is_nan() {
                    rank_top(scores, budget, ranking);
                    counts[ei][group].add(layer, ranking, truth);
                }
            }
            let Some((st, slots)) = stats else { continue };
            let prev = (t > 0 && view.seq[t - 1] == view.seq[t])
                .then(|| view.layer(t - 1, layer))
                .flatten();
            st.rank_previous(layer, prev, budget, ranking);
            counts[slots.previous][group].add(layer, ranking, truth);
            st.rank_frequency(layer, budget, ranking);
            counts[slots.frequency][group].add(layer, ranking, truth);
            let token = (view.token[t] != datasets::UNKNOWN_TOKEN).then_some(view.token[t]);
            if let Some(i) = slots.token {
                st.rank_token(layer, token, budget, ranking);
                counts[i][group].add(layer, ranking, truth);
            }
            // Co-activation needs a known layer of the current token.
            if q.known > 0 {
                let src = q.known - 1;
                let given = view.layer(t, src);
                if let Some(i) = slots.coactivation {
                    match given {
                        Some(g) => st.rank_coactivation(src, layer - src, g, budget, ranking),
                        None => st.rank_frequency(layer, budget, ranking),
                    }
                    counts[i][group].add(layer, ranking, truth);
                }
                if let Some(i) = slots.combined {
                    match given {
                        Some(g) => st.rank_combined(src, layer - src, g, token, budget, ranking),
                        None => st.rank_token(layer, token, budget, ranking),
                    }
                    counts[i][group].add(layer, ranking, truth);
                }
            }
        }
    }
}

fn group_report(c: &LayerCounts) -> GroupReport {
    GroupReport {
        overall: c.total().summary(),
        calibration: None,
        per_layer: c
            .layers
            .iter()
            .map(|l| (l.sets > 0).then(|| l.summary()))
            .collect(),
    }
}

fn progress_bar(show: bool, len: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} windows (eta {eta})",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    b
}
