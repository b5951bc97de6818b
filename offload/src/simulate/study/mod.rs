//! A simulation study, what `moecast simulate` runs: one trace (a file or a dataset
//! folder's parts, each replayed from a cold cache) through every cache size x eviction
//! policy x prefetcher x budget, timed and untimed, with its table, JSON and chart.

use std::path::{Path, PathBuf};

use datasets::channel::PRE_ATTENTION_LOGITS;
use datasets::{open_trace, TraceView};
use predictor::baselines::BaselineStats;
use predictor::{LoadedPredictor, OnlinePredictor};

use super::{simulate, PrefetchPlan, SimConfig, SimReport};

mod output;
use crate::cache::CacheSize;
use crate::gate::{GateForecaster, NextTokenGate};
use crate::planner::PrefetchBudget;
use crate::prefetch::{self, PrefetchKind};

/// Why a study could not run, naming the file or setting.
#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    #[error("{0}")]
    Settings(String),
    #[error(transparent)]
    Trace(#[from] datasets::TraceError),
    #[error(transparent)]
    Model(#[from] inference::ModelError),
    #[error(transparent)]
    Predictor(#[from] predictor::PredictorError),
}

fn bad(msg: impl Into<String>) -> StudyError {
    StudyError::Settings(msg.into())
}

/// The settings of a study (`moecast simulate`'s options).
#[derive(Clone, Debug)]
pub struct StudySettings {
    /// The trace as given (for messages).
    pub trace: PathBuf,
    /// Its trace files: the file itself, or a dataset folder's memory-mapped parts.
    pub parts: Vec<PathBuf>,
    /// Cache sizes: N experts or P% of all experts.
    pub cache: Vec<String>,
    /// Sweep 5%, 10%, ..., 50% instead of `cache`.
    pub sweep: bool,
    /// Eviction policies.
    pub policy: Vec<String>,
    /// Prefetchers, each a kind or a union `a+b`.
    pub prefetch: Vec<String>,
    /// Predictor directory (learned prefetch; its counts feed token and co-activation).
    pub predictor: Option<PathBuf>,
    /// The checkpoint the trace comes from (gate, pre-attention and lens prefetch).
    pub model: Option<PathBuf>,
    /// Budgets: `auto` or N per layer.
    pub budget: Vec<String>,
    /// Chunk size of planned prefetch reads, bytes.
    pub chunk_bytes: f64,
    /// Layers ahead for the cross-layer prefetchers.
    pub horizon: usize,
    /// One equal share of the cache per layer.
    pub per_layer: bool,
    /// Link bandwidth, GB/s.
    pub bandwidth: f64,
    /// Bytes of one expert (default: the trace's).
    pub expert_bytes: Option<f64>,
    /// Compute of one layer's experts, microseconds.
    pub compute_us_per_layer: f64,
    /// Attention of one layer before it routes, microseconds.
    pub attention_us_per_layer: f64,
    /// Earliest deadline first on the link (else in the order issued).
    pub deadline_order: bool,
}

/// One row of the table: a cache size, policy, prefetcher and budget, timed and untimed.
#[derive(Clone, Debug)]
pub struct StudyRow {
    pub cache: String,
    pub timed: SimReport,
    pub untimed: SimReport,
}

/// A finished study: its rows (summed over the trace's parts) and what it assumed.
#[derive(Clone, Debug)]
pub struct Study {
    pub settings: StudySettings,
    pub rows: Vec<StudyRow>,
    pub tokens: usize,
    pub n_moe: usize,
    pub n_experts: usize,
    pub top_k: usize,
    pub expert_bytes: f64,
    /// Candidates per layer the plans hold (the planner picks from twice top-k).
    pub candidates: usize,
    /// Remarks for the user (in-sample counts and the like).
    pub notes: Vec<String>,
}

/// The predictor's training counts, or counts fitted on the replayed trace itself (also
/// when the token table is needed and the predictor's counts predate it).
fn counts_for(
    fitted: &Option<BaselineStats>,
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    horizon: usize,
    token_table: bool,
    notes: &mut Vec<String>,
) -> BaselineStats {
    match fitted {
        Some(s) if s.has_token_table() || !token_table => return s.clone(),
        Some(_) => notes.push(
            "the predictor's baselines have no token table (trained before it): fitted on this trace itself (in-sample)".into(),
        ),
        None => {}
    }
    let m = view.meta.n_moe();
    let mut s = BaselineStats::new(
        datasets::examples::RoutingShape::of(view.meta),
        horizon.min(m - 1).max(1),
    );
    for r in seqs {
        s.add_tokens(view, r.clone());
    }
    s
}

/// The forecasters a study needs, loaded once.
struct Forecasters {
    online: Option<OnlinePredictor>,
    model: Option<inference::MoeModel>,
    gate: Option<GateForecaster>,
    lens: Option<NextTokenGate>,
    fitted: Option<BaselineStats>,
    /// Candidates per layer and layers ahead of every plan.
    candidates: usize,
    horizon: usize,
}

impl Forecasters {
    fn load(
        s: &StudySettings,
        meta: &datasets::TraceMeta,
        kinds: &[PrefetchKind],
        candidates: usize,
    ) -> Result<Self, StudyError> {
        let loaded = match &s.predictor {
            Some(dir) => Some(LoadedPredictor::load(
                dir,
                &predictor::device::BackendKind::Flex.device(),
            )?),
            None => None,
        };
        if let Some(p) = &loaded {
            p.card.config.routing.check(meta, &s.trace)?;
        }
        let online = loaded.map(OnlinePredictor::new);
        // Pre-attention logits recorded in the trace (`collect --pre-attention-logits`)
        // stand in for the model.
        let recorded_pre_attention = meta.channel(PRE_ATTENTION_LOGITS).is_some();
        let needs_model = kinds.iter().any(|k| match k {
            PrefetchKind::Gate | PrefetchKind::Lens => true,
            PrefetchKind::PreAttention => !recorded_pre_attention,
            _ => false,
        });
        let mut model = match (needs_model, &s.model) {
            (false, _) => None,
            (true, None) => {
                return Err(bad(
                    "--prefetch gate, pre-attention and lens need --model DIR (the checkpoint the trace comes from; pre-attention also runs on a trace collected with --pre-attention-logits)",
                ))
            }
            (true, Some(dir)) => Some(inference::MoeModel::load(&inference::Checkpoint::open(dir)?, &Default::default())?),
        };
        let gate = match (kinds.contains(&PrefetchKind::Gate), model.as_mut()) {
            (true, Some(model)) => Some(GateForecaster::new(model)),
            _ => None,
        };
        let lens = match (kinds.contains(&PrefetchKind::Lens), model.as_ref()) {
            (true, Some(model)) => {
                let counts = online
                    .as_ref()
                    .and_then(|o| o.predictor().baselines.as_ref());
                Some(NextTokenGate::new(model)?.with_counts(counts)?)
            }
            _ => None,
        };
        if kinds.contains(&PrefetchKind::Learned) && online.is_none() {
            return Err(bad("--prefetch learned needs --predictor DIR"));
        }
        let fitted = online
            .as_ref()
            .and_then(|o| o.predictor().baselines.clone());
        Ok(Forecasters {
            online,
            model,
            gate,
            lens,
            fitted,
            candidates,
            horizon: s.horizon,
        })
    }

    /// Every part must carry the router inputs its readers need, of their width.
    fn check(
        &self,
        part: &Path,
        view: &TraceView<'_>,
        kinds: &[PrefetchKind],
    ) -> Result<(), StudyError> {
        let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
        let dim = view.meta.router_input_dim();
        let named = |msg: String| bad(format!("{}: {msg}", part.display()));
        if let (true, Some(o)) = (kinds.contains(&PrefetchKind::Learned), &self.online) {
            o.predictor()
                .card
                .config
                .check_router_input_dim(dim)
                .map_err(named)?;
        }
        if let Some(g) = &self.gate {
            g.check(m, e, dim).map_err(|err| named(err.to_string()))?;
        }
        if let Some(g) = &self.lens {
            g.check(m, e, dim).map_err(|err| named(err.to_string()))?;
        }
        if kinds.contains(&PrefetchKind::PreAttention)
            && self.model.is_none()
            && view.meta.channel(PRE_ATTENTION_LOGITS).is_none()
        {
            return Err(named(
                "no pre_attention_logits channel (the first part has one): give --model DIR or collect every part with --pre-attention-logits".into(),
            ));
        }
        Ok(())
    }

    fn plan(
        &mut self,
        kind: PrefetchKind,
        part: &Path,
        view: &TraceView<'_>,
        seqs: &[std::ops::Range<usize>],
        notes: &mut Vec<String>,
    ) -> Result<PrefetchPlan, StudyError> {
        let (budget, horizon) = (self.candidates, self.horizon);
        let missing = |what: &str| bad(format!("no {what} loaded"));
        Ok(match kind {
            PrefetchKind::None => PrefetchPlan::empty("none", view.n_tokens(), view.meta.n_moe()),
            PrefetchKind::Oracle => prefetch::oracle(view, seqs, horizon),
            PrefetchKind::Previous => prefetch::previous(view, seqs),
            PrefetchKind::Activation => prefetch::activation(view, seqs, budget, horizon, 0.9),
            PrefetchKind::Coactivation => {
                let stats = counts_for(&self.fitted, view, seqs, horizon, false, notes);
                prefetch::coactivation(view, seqs, &stats, budget, horizon)
            }
            PrefetchKind::Blend => {
                let stats = counts_for(&self.fitted, view, seqs, horizon, false, notes);
                prefetch::blend(view, seqs, &stats, budget, horizon).0
            }
            PrefetchKind::Token => {
                let stats = counts_for(&self.fitted, view, seqs, horizon, true, notes);
                prefetch::token(view, seqs, &stats, budget, horizon)
            }
            PrefetchKind::Gate => {
                let g = self
                    .gate
                    .as_ref()
                    .ok_or_else(|| missing("gate forecaster"))?;
                prefetch::gate(view, seqs, &|t, x| g.scores(t, x), budget, horizon)
            }
            PrefetchKind::PreAttention => match view
                .channel_column(PRE_ATTENTION_LOGITS)
                .and_then(|c| c.as_f32())
            {
                Some(logits) => prefetch::pre_attention(view, seqs, logits, budget),
                None => {
                    let model = self.model.as_ref().ok_or_else(|| missing("model"))?;
                    let logits = crate::gate::pre_attention_logits(model, view)
                        .map_err(|e| bad(format!("{}: {e}", part.display())))?;
                    prefetch::pre_attention(view, seqs, &logits, budget)
                }
            },
            PrefetchKind::Lens => {
                let g = self
                    .lens
                    .as_ref()
                    .ok_or_else(|| missing("next-token gate"))?;
                prefetch::lens(view, seqs, g, budget)
            }
            PrefetchKind::Learned => {
                let o = self
                    .online
                    .as_mut()
                    .ok_or_else(|| missing("learned predictor"))?;
                prefetch::learned(view, seqs, o, budget, horizon)?
            }
        })
    }
}

/// Runs the study; `progress(done, total)` after each part.
pub fn run_study(
    s: &StudySettings,
    mut progress: impl FnMut(usize, usize),
) -> Result<Study, StudyError> {
    let first = s
        .parts
        .first()
        .ok_or_else(|| bad(format!("{}: no trace files", s.trace.display())))?;
    let meta = open_trace(first)?.view().meta.clone();
    let (m, e, k) = (meta.n_moe(), meta.n_experts as usize, meta.top_k as usize);
    let total = m * e;
    let expert_bytes = match (s.expert_bytes, &meta.expert_bytes) {
        (Some(b), _) => b,
        (None, Some(v)) if !v.is_empty() => v.iter().sum::<u64>() as f64 / v.len() as f64,
        _ => {
            return Err(bad(format!(
                "{}: the trace does not record expert sizes; pass --expert-bytes B",
                s.trace.display()
            )))
        }
    };
    let non_negative = |x: f64| x >= 0.0;
    if s.bandwidth.is_nan()
        || s.bandwidth <= 0.0
        || !non_negative(s.compute_us_per_layer)
        || !non_negative(s.attention_us_per_layer)
    {
        return Err(bad(
            "--bandwidth must be positive, --compute-us-per-layer and --attention-us-per-layer not negative",
        ));
    }
    if s.chunk_bytes.is_nan() || s.chunk_bytes <= 0.0 {
        return Err(bad("--chunk-bytes must be positive"));
    }
    let budgets: Vec<PrefetchBudget> = s
        .budget
        .iter()
        .map(|b| b.parse().map_err(|e| bad(format!("--budget: {e}"))))
        .collect::<Result<_, _>>()?;
    // The planner picks from twice top-k candidates per layer.
    let candidates = budgets
        .iter()
        .map(|b| match b {
            PrefetchBudget::Auto => 2 * k,
            PrefetchBudget::PerLayer(n) => *n,
        })
        .max()
        .unwrap_or(k)
        .min(e);
    // Each --prefetch entry is a prefetcher or a union such as learned+pre-attention.
    let combos: Vec<Vec<PrefetchKind>> = s
        .prefetch
        .iter()
        .map(|c| {
            c.split('+')
                .map(|k| k.parse().map_err(bad))
                .collect::<Result<_, _>>()
        })
        .collect::<Result<_, _>>()?;
    let mut kinds: Vec<PrefetchKind> = Vec::new();
    for k in combos.iter().flatten() {
        if !kinds.contains(k) {
            kinds.push(*k);
        }
    }
    let mut forecasters = Forecasters::load(s, &meta, &kinds, candidates)?;
    let sizes: Vec<String> = if s.sweep {
        (1..=10).map(|i| format!("{}%", i * 5)).collect()
    } else {
        s.cache.clone()
    };
    let capacities = sizes
        .iter()
        .map(|c| Ok(c.parse::<CacheSize>().map_err(bad)?.experts(total)))
        .collect::<Result<Vec<_>, StudyError>>()?;
    let mut notes = Vec::new();
    let counted = [
        PrefetchKind::Coactivation,
        PrefetchKind::Blend,
        PrefetchKind::Token,
    ];
    if counted.iter().any(|k| kinds.contains(k)) && forecasters.fitted.is_none() {
        notes.push("no --predictor: token-table and co-activation counts (and the blend's) are fitted on this trace itself (in-sample)".into());
    }
    let mut rows: Vec<StudyRow> = Vec::new();
    let mut tokens = 0;
    for (done, part) in s.parts.iter().enumerate() {
        let opened = open_trace(part)?;
        let view = opened.view();
        if !view.meta.same_shape(&meta) {
            return Err(bad(format!(
                "{}: model shape differs from the first part",
                part.display()
            )));
        }
        forecasters.check(part, &view, &kinds)?;
        tokens += view.n_tokens();
        let seqs = view.sequence_ranges();
        let mut plans = Vec::with_capacity(kinds.len());
        for &kind in &kinds {
            plans.push(forecasters.plan(kind, part, &view, &seqs, &mut notes)?);
        }
        // The oracle's own row also reads with every shorter lead, and the fastest counts:
        // on a small cache a long lead crowds out experts still needed.
        let shorter_leads: Vec<PrefetchPlan> =
            match combos.iter().any(|c| c == &[PrefetchKind::Oracle]) {
                true => (1..s.horizon.min(m))
                    .map(|h| prefetch::oracle(&view, &seqs, h))
                    .collect(),
                false => Vec::new(),
            };
        let plans_at = plans_at_budgets(&combos, &kinds, &plans, &shorter_leads, &budgets, e);
        let mut i = 0;
        for (size, &capacity) in sizes.iter().zip(&capacities) {
            for policy in &s.policy {
                for (alternatives, budget) in &plans_at {
                    let replay = |plan: &PrefetchPlan| {
                        simulate_both(
                            s,
                            &view,
                            &seqs,
                            plan,
                            *budget,
                            capacity,
                            policy,
                            expert_bytes,
                        )
                    };
                    let mut best = replay(&alternatives[0])?;
                    for plan in &alternatives[1..] {
                        let both = replay(plan)?;
                        if both.0.tokens_per_s() > best.0.tokens_per_s() {
                            best = both;
                        }
                    }
                    let (timed, untimed) = best;
                    match rows.get_mut(i) {
                        Some(row) => {
                            row.timed.merge(&timed);
                            row.untimed.merge(&untimed);
                        }
                        None => rows.push(StudyRow {
                            cache: size.clone(),
                            timed,
                            untimed,
                        }),
                    }
                    i += 1;
                }
            }
        }
        progress(done + 1, s.parts.len());
    }
    notes.sort();
    notes.dedup();
    Ok(Study {
        settings: s.clone(),
        rows,
        tokens,
        n_moe: m,
        n_experts: e,
        top_k: k,
        expert_bytes,
        candidates,
        notes,
    })
}

/// Each prefetcher (or union) at each budget; none and the oracle once (they have none).
/// Each row's plan comes with its alternatives, the fastest of which is reported: the
/// oracle alone with `shorter_leads` (the same oracle reading fewer layers ahead).
fn plans_at_budgets(
    combos: &[Vec<PrefetchKind>],
    kinds: &[PrefetchKind],
    plans: &[PrefetchPlan],
    shorter_leads: &[PrefetchPlan],
    budgets: &[PrefetchBudget],
    n_experts: usize,
) -> Vec<(Vec<PrefetchPlan>, Option<PrefetchBudget>)> {
    let mut out = Vec::new();
    for combo in combos {
        let parts: Vec<&PrefetchPlan> = combo
            .iter()
            .filter_map(|k| kinds.iter().position(|x| x == k).map(|i| &plans[i]))
            .collect();
        let plan = PrefetchPlan::union(&parts);
        if combo
            .iter()
            .all(|k| matches!(k, PrefetchKind::None | PrefetchKind::Oracle))
        {
            let mut alternatives = vec![plan];
            if combo == &[PrefetchKind::Oracle] {
                alternatives.extend(shorter_leads.iter().cloned());
            }
            out.push((alternatives, None));
            continue;
        }
        for &b in budgets {
            match b {
                PrefetchBudget::PerLayer(n) => {
                    out.push((vec![plan.truncated(n, n_experts)], Some(b)))
                }
                PrefetchBudget::Auto => out.push((vec![plan.clone()], Some(b))),
            }
        }
    }
    out
}

/// One row's timed and untimed replays (untimed there is no link to plan against:
/// every candidate is read).
#[allow(clippy::too_many_arguments)]
fn simulate_both(
    s: &StudySettings,
    view: &TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    plan: &PrefetchPlan,
    budget: Option<PrefetchBudget>,
    capacity: usize,
    policy: &str,
    expert_bytes: f64,
) -> Result<(SimReport, SimReport), StudyError> {
    let planned = budget == Some(PrefetchBudget::Auto);
    let cfg = SimConfig {
        capacity,
        per_layer: s.per_layer,
        policy: policy.to_string(),
        bandwidth_gbps: s.bandwidth,
        expert_bytes,
        compute_us_per_layer: s.compute_us_per_layer,
        attention_us_per_layer: s.attention_us_per_layer,
        untimed: false,
        deadline_order: s.deadline_order,
        chunk_bytes: if planned { s.chunk_bytes } else { 0.0 },
        planned,
    };
    let label = budget.map_or("-".to_string(), |b| b.to_string());
    let mut timed = simulate(view, seqs, plan, &cfg).map_err(bad)?;
    timed.budget = label.clone();
    let untimed_cfg = SimConfig {
        untimed: true,
        planned: false,
        chunk_bytes: 0.0,
        ..cfg
    };
    let mut untimed = simulate(view, seqs, plan, &untimed_cfg).map_err(bad)?;
    untimed.budget = label;
    Ok((timed, untimed))
}
