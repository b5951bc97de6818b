//! `moecast simulate`: trace-driven expert-cache simulation.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use datasets::open_trace;
use inference::planner::PrefetchBudget;
use inference::prefetch::{self, PrefetchKind};
use inference::simulate::{simulate, PrefetchPlan, SimConfig, SimReport};
use predictor::baselines::BaselineStats;
use predictor::{LoadedPredictor, OnlinePredictor};

/// Order of queued prefetches on the link.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LinkOrder {
    Issue,
    Deadline,
}

#[derive(Args)]
pub(crate) struct SimulateArgs {
    /// Trace to replay (any storage form).
    #[arg(long)]
    trace: PathBuf,
    /// Cache sizes: N experts or P% of all experts, comma-separated (e.g. 10%,25%).
    #[arg(long, default_value = "10%", value_delimiter = ',')]
    cache: Vec<String>,
    /// Sweep cache sizes 5%, 10%, ..., 50% (overrides --cache) and plot hit rate vs size.
    #[arg(long)]
    sweep: bool,
    /// Eviction policies: lru, lfu, lfu:DECAY, next-use, belady; comma-separated.
    #[arg(long, default_value = "lru", value_delimiter = ',')]
    policy: Vec<String>,
    /// Prefetchers: none, previous, token, coactivation, activation, gate, pre-attention, lens, learned, oracle; comma-separated (a+b: both).
    #[arg(long, default_value = "none", value_delimiter = ',')]
    prefetch: Vec<String>,
    /// Predictor directory (learned prefetch; its training baselines feed token and
    /// coactivation, and its per-token first-layer counts refine the lens).
    #[arg(long)]
    predictor: Option<PathBuf>,
    /// The MoE checkpoint the trace comes from (gate prefetch: its gates applied to the
    /// trace's router inputs; pre-attention prefetch: the model replays the token ids;
    /// lens prefetch: its LM head read at the last MoE layer's router input).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prefetch budgets, comma-separated: `auto` (the planner: each forecast expert is
    /// read only when it pays against the link, from its calibrated probability, its
    /// deadline and the link's queue; reads go in --chunk-bytes chunks behind demand
    /// reads) or N (the best N experts of every predicted layer at every event).
    #[arg(long, default_value = "auto", value_delimiter = ',')]
    budget: Vec<String>,
    /// Planned prefetch reads go in chunks of this many bytes; a demand read waits at
    /// most for the chunk on the link.
    #[arg(long, default_value_t = 1048576.0)]
    chunk_bytes: f64,
    /// Layers ahead for the coactivation, activation, gate and learned prefetchers
    /// (learned: at most the predictor's own horizon).
    #[arg(long, default_value_t = 3)]
    horizon: usize,
    /// One equal share of the cache per layer instead of one pool.
    #[arg(long)]
    per_layer: bool,
    /// Link bandwidth for expert transfers, GB/s.
    #[arg(long, default_value_t = 3.0)]
    bandwidth: f64,
    /// Bytes of one expert (default: the trace's expert_bytes).
    #[arg(long)]
    expert_bytes: Option<f64>,
    /// Compute time of one layer's experts (after it routes), microseconds.
    #[arg(long, default_value_t = 30.0)]
    compute_us_per_layer: f64,
    /// Attention time of one layer (before it routes), microseconds; 0 lumps a layer's
    /// time after its routing. Pre-attention prefetches have this long to land.
    #[arg(long, default_value_t = 0.0)]
    attention_us_per_layer: f64,
    /// Order of queued prefetches on the link: `deadline` (the layer that needs them
    /// soonest first) or `issue` (first issued, first sent).
    #[arg(long, value_enum, default_value_t = LinkOrder::Deadline)]
    link_order: LinkOrder,
    /// Write every result as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the hit-rate-vs-cache-size chart (PNG) into this directory.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// The predictor's training counts, or counts fitted on the replayed trace itself (also
/// when the token table is needed and the predictor's counts predate it).
fn counts_for(
    fitted: &Option<BaselineStats>,
    view: &datasets::TraceView<'_>,
    seqs: &[std::ops::Range<usize>],
    horizon: usize,
    token_table: bool,
) -> BaselineStats {
    match fitted {
        Some(s) if s.has_token_table() || !token_table => return s.clone(),
        Some(_) => eprintln!(
            "note: the predictor's baselines have no token table (trained before it): fitted on this trace itself (in-sample)"
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

fn parse_size(s: &str, total: usize) -> Result<usize> {
    let n = match s.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p.parse().with_context(|| format!("bad cache size '{s}'"))?;
            if !(p > 0.0 && p <= 100.0) {
                bail!("cache size '{s}' must be in (0, 100]%");
            }
            ((total as f64 * p / 100.0).round() as usize).max(1)
        }
        None => s
            .parse()
            .with_context(|| format!("bad cache size '{s}' (N or P%)"))?,
    };
    if n == 0 {
        bail!("cache size '{s}' must be at least one expert");
    }
    Ok(n.min(total))
}

pub(crate) fn simulate_cmd(a: SimulateArgs) -> Result<()> {
    // A dataset is replayed one memory-mapped shard at a time, each from a cold cache.
    let pieces = crate::inputs::trace_files(std::slice::from_ref(&a.trace))?;
    let first = open_trace(&pieces[0])?;
    let meta = first.view().meta.clone();
    drop(first);
    let (m, e, k) = (meta.n_moe(), meta.n_experts as usize, meta.top_k as usize);
    let total = m * e;
    let expert_bytes = match (a.expert_bytes, &meta.expert_bytes) {
        (Some(b), _) => b,
        (None, Some(v)) if !v.is_empty() => v.iter().sum::<u64>() as f64 / v.len() as f64,
        _ => bail!(
            "{}: the trace does not record expert sizes; pass --expert-bytes B",
            a.trace.display()
        ),
    };
    let non_negative = |x: f64| x >= 0.0;
    if a.bandwidth.is_nan()
        || a.bandwidth <= 0.0
        || !non_negative(a.compute_us_per_layer)
        || !non_negative(a.attention_us_per_layer)
    {
        bail!("--bandwidth must be positive, --compute-us-per-layer and --attention-us-per-layer not negative");
    }
    let budgets: Vec<PrefetchBudget> = a
        .budget
        .iter()
        .map(|b| b.parse().map_err(|e| anyhow!("--budget: {e}")))
        .collect::<Result<_>>()?;
    if a.chunk_bytes.is_nan() || a.chunk_bytes <= 0.0 {
        bail!("--chunk-bytes must be positive");
    }
    // The planner picks from twice top-k candidates per layer.
    let budget = budgets
        .iter()
        .map(|b| match b {
            PrefetchBudget::Auto => 2 * k,
            PrefetchBudget::PerLayer(n) => *n,
        })
        .max()
        .unwrap_or(k)
        .min(e);
    // Each --prefetch entry is a prefetcher or a union such as learned+pre-attention.
    let combos: Vec<Vec<PrefetchKind>> = a
        .prefetch
        .iter()
        .map(|s| {
            s.split('+')
                .map(|k| k.parse().map_err(anyhow::Error::msg))
                .collect::<Result<_>>()
        })
        .collect::<Result<_>>()?;
    let mut kinds: Vec<PrefetchKind> = Vec::new();
    for k in combos.iter().flatten() {
        if !kinds.contains(k) {
            kinds.push(*k);
        }
    }
    let loaded = match &a.predictor {
        Some(dir) => Some(LoadedPredictor::load(
            dir,
            &predictor::device::BackendKind::Flex.device(),
        )?),
        None => None,
    };
    if let Some(p) = &loaded {
        p.card.config.routing.check(&meta, &a.trace)?;
    }
    // Loaded once: its baselines feed co-activation, the model feeds learned prefetch.
    let mut online = loaded.map(OnlinePredictor::new);
    let needs_model = kinds.iter().any(|k| {
        matches!(
            k,
            PrefetchKind::Gate | PrefetchKind::PreAttention | PrefetchKind::Lens
        )
    });
    let mut model = match (needs_model, &a.model) {
        (false, _) => None,
        (true, None) => bail!(
            "--prefetch gate, pre-attention and lens need --model DIR (the checkpoint the trace comes from)"
        ),
        (true, Some(dir)) => Some(inference::MoeModel::load(
            &inference::Checkpoint::open(dir)?,
            &Default::default(),
        )?),
    };
    let gate = match (kinds.contains(&PrefetchKind::Gate), model.as_mut()) {
        (true, Some(model)) => Some(inference::gate::GateForecaster::new(model)),
        _ => None,
    };
    let lens = match (kinds.contains(&PrefetchKind::Lens), model.as_ref()) {
        (true, Some(model)) => {
            let g = inference::gate::NextTokenGate::new(model)?;
            let counts = online
                .as_ref()
                .and_then(|o| o.predictor().baselines.as_ref());
            Some(g.with_counts(counts)?)
        }
        _ => None,
    };
    if kinds.contains(&PrefetchKind::Learned) && online.is_none() {
        bail!("--prefetch learned needs --predictor DIR");
    }
    let sizes: Vec<String> = if a.sweep {
        (1..=10).map(|i| format!("{}%", i * 5)).collect()
    } else {
        a.cache.clone()
    };
    let capacities = sizes
        .iter()
        .map(|s| parse_size(s, total))
        .collect::<Result<Vec<_>>>()?;
    let fitted = online
        .as_ref()
        .and_then(|o| o.predictor().baselines.clone());
    let counted = [PrefetchKind::Coactivation, PrefetchKind::Token];
    if counted.iter().any(|k| kinds.contains(k)) && fitted.is_none() {
        eprintln!("note: no --predictor: token-table and co-activation counts are fitted on this trace itself (in-sample)");
    }
    let bar = crate::inputs::bar(pieces.len(), "parts");
    // results[i]: (size, timed, untimed) in size x policy x plan order, summed over pieces.
    let mut results: Vec<(String, SimReport, SimReport)> = Vec::new();
    let mut tokens = 0;
    for piece in &pieces {
        let opened = open_trace(piece)?;
        let view = opened.view();
        if !view.meta.same_shape(&meta) {
            bail!(
                "{}: model shape differs from the first part",
                piece.display()
            );
        }
        // Every part must carry the router inputs its readers need, of their width.
        let dim = view.meta.router_input_dim;
        if let (true, Some(o)) = (kinds.contains(&PrefetchKind::Learned), &online) {
            o.predictor()
                .card
                .config
                .check_router_input_dim(dim)
                .map_err(|e| anyhow!("{}: {e}", piece.display()))?;
        }
        if let Some(g) = &gate {
            g.check(m, e, dim)
                .with_context(|| piece.display().to_string())?;
        }
        if let Some(g) = &lens {
            g.check(m, e, dim)
                .with_context(|| piece.display().to_string())?;
        }
        tokens += view.n_tokens();
        let seqs = view.sequence_ranges();
        let mut plans: Vec<PrefetchPlan> = Vec::new();
        for kind in &kinds {
            let plan = match kind {
                PrefetchKind::None => PrefetchPlan::empty("none", view.n_tokens(), m),
                PrefetchKind::Oracle => prefetch::oracle(&view, &seqs),
                PrefetchKind::Previous => prefetch::previous(&view, &seqs),
                PrefetchKind::Activation => {
                    prefetch::activation(&view, &seqs, budget, a.horizon, 0.9)
                }
                PrefetchKind::Coactivation => {
                    let stats = counts_for(&fitted, &view, &seqs, a.horizon, false);
                    prefetch::coactivation(&view, &seqs, &stats, budget, a.horizon)
                }
                PrefetchKind::Token => {
                    let stats = counts_for(&fitted, &view, &seqs, a.horizon, true);
                    prefetch::token(&view, &seqs, &stats, budget, a.horizon)
                }
                PrefetchKind::Gate => {
                    let g = gate.as_ref().context("gate forecaster")?;
                    prefetch::gate(&view, &seqs, &|t, x| g.scores(t, x), budget, a.horizon)
                }
                PrefetchKind::PreAttention => {
                    let model = model.as_ref().context("model")?;
                    let logits = inference::gate::pre_attention_logits(model, &view)
                        .with_context(|| piece.display().to_string())?;
                    prefetch::pre_attention(&view, &seqs, &logits, budget)
                }
                PrefetchKind::Lens => {
                    let g = lens.as_ref().context("next-token gate")?;
                    prefetch::lens(&view, &seqs, g, budget)
                }
                PrefetchKind::Learned => {
                    let o = online.as_mut().context("learned predictor")?;
                    prefetch::learned(&view, &seqs, o, budget, a.horizon)?
                }
            };
            plans.push(plan);
        }
        // Each prefetcher at each budget (none and the oracle once: they have none).
        let mut plans_at: Vec<(PrefetchPlan, Option<PrefetchBudget>)> = Vec::new();
        for combo in &combos {
            let parts: Vec<&PrefetchPlan> = combo
                .iter()
                .filter_map(|k| kinds.iter().position(|x| x == k).map(|i| &plans[i]))
                .collect();
            let plan = PrefetchPlan::union(&parts);
            if combo
                .iter()
                .all(|k| matches!(k, PrefetchKind::None | PrefetchKind::Oracle))
            {
                plans_at.push((plan, None));
                continue;
            }
            for &b in &budgets {
                match b {
                    PrefetchBudget::PerLayer(n) => plans_at.push((plan.truncated(n, e), Some(b))),
                    PrefetchBudget::Auto => plans_at.push((plan.clone(), Some(b))),
                }
            }
        }
        let mut i = 0;
        for (size, &capacity) in sizes.iter().zip(&capacities) {
            for policy in &a.policy {
                for (plan, budget) in &plans_at {
                    let planned = *budget == Some(PrefetchBudget::Auto);
                    let cfg = SimConfig {
                        capacity,
                        per_layer: a.per_layer,
                        policy: policy.clone(),
                        bandwidth_gbps: a.bandwidth,
                        expert_bytes,
                        compute_us_per_layer: a.compute_us_per_layer,
                        attention_us_per_layer: a.attention_us_per_layer,
                        untimed: false,
                        deadline_order: a.link_order == LinkOrder::Deadline,
                        chunk_bytes: if planned { a.chunk_bytes } else { 0.0 },
                        planned,
                    };
                    let label = budget.map_or("-".to_string(), |b| b.to_string());
                    let mut r = simulate(&view, &seqs, plan, &cfg).map_err(anyhow::Error::msg)?;
                    r.budget = label.clone();
                    let u = simulate(
                        &view,
                        &seqs,
                        plan,
                        // Untimed there is no link to plan against: every candidate is read.
                        &SimConfig {
                            untimed: true,
                            planned: false,
                            chunk_bytes: 0.0,
                            ..cfg
                        },
                    )
                    .map_err(anyhow::Error::msg)?;
                    let u = SimReport { budget: label, ..u };
                    match results.get_mut(i) {
                        Some((_, rt, ut)) => {
                            rt.merge(&r);
                            ut.merge(&u);
                        }
                        None => results.push((size.clone(), r, u)),
                    }
                    i += 1;
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if pieces.len() > 1 {
        println!(
            "{} parts, each replayed from a cold cache (sums below)",
            pieces.len()
        );
    }
    println!(
        "{} tokens, {} MoE layers x {} experts (top-{k}); expert {:.0} bytes over {} GB/s = {:.1} us, compute {} us/layer{}{}",
        tokens, m, e, expert_bytes, a.bandwidth, expert_bytes / (a.bandwidth * 1e3), a.compute_us_per_layer,
        if a.attention_us_per_layer > 0.0 { format!(" after {} us of attention", a.attention_us_per_layer) } else { String::new() },
        if a.link_order == LinkOrder::Issue { ", sent in the order issued" } else { "" }
    );
    println!(
        "budget N: the best N experts of every forecast layer at every event; auto: planned against the link (from {budget} candidates per layer, {:.0}-byte chunks, losers cancelled); untimed: every candidate read instantly",
        a.chunk_bytes
    );
    let w = results
        .iter()
        .map(|(_, r, _)| r.prefetch.len())
        .max()
        .unwrap_or(0)
        .max(13);
    println!(
        "{:>8} {:>7} {:<w$} {:>6} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9} {:>12}",
        "cache",
        "policy",
        "prefetch",
        "budget",
        "hit",
        "late",
        "stall/tok",
        "tokens/s",
        "MB moved",
        "useful",
        "untimed hit"
    );
    for (size, r, u) in &results {
        println!(
            "{:>8} {:>7} {:<w$} {:>6} {:>7.1}% {:>7.1}% {:>7.1}us {:>10.0} {:>9.1} {:>8.1}% {:>11.1}%",
            format!("{size}={}", r.capacity),
            r.policy,
            r.prefetch,
            r.budget,
            100.0 * r.hit_rate(),
            100.0 * r.late as f64 / r.accesses.max(1) as f64,
            r.stall_us_per_token(),
            r.tokens_per_s(),
            (r.bytes_demand + r.bytes_prefetch) / 1e6,
            100.0 * r.useful_prefetches as f64 / r.prefetches.max(1) as f64,
            100.0 * u.hit_rate()
        );
    }
    if let Some(path) = &a.json {
        let settings = serde_json::json!({
            "bandwidth_gbps": a.bandwidth, "expert_bytes": expert_bytes,
            "compute_us_per_layer": a.compute_us_per_layer,
            "attention_us_per_layer": a.attention_us_per_layer,
            "link_order": if a.link_order == LinkOrder::Issue { "issue" } else { "deadline" },
            "budgets": a.budget, "chunk_bytes": a.chunk_bytes, "candidates_per_layer": budget, "horizon": a.horizon, "per_layer_cache": a.per_layer,
        });
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|(size, r, u)| {
                serde_json::json!({
                    "cache": size, "settings": settings, "timed": r, "untimed": u,
                    "hit_rate": r.hit_rate(), "untimed_hit_rate": u.hit_rate(),
                    "tokens_per_s": r.tokens_per_s(), "stall_us_per_token": r.stall_us_per_token(),
                })
            })
            .collect();
        predictor::state::write_atomic(path, serde_json::to_string_pretty(&rows)?.as_bytes())?;
        eprintln!("results -> {}", path.display());
    }
    if let Some(dir) = &a.plot {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        let mut series_data: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for (_, r, _) in &results {
            let name = match r.budget.as_str() {
                "-" => format!("{} + {}", r.policy, r.prefetch),
                b => format!("{} + {} ({b})", r.policy, r.prefetch),
            };
            let x = 100.0 * r.capacity as f64 / total as f64;
            match series_data.iter_mut().find(|(n, _)| *n == name) {
                Some((_, pts)) => pts.push((x, 100.0 * r.hit_rate())),
                None => series_data.push((name, vec![(x, 100.0 * r.hit_rate())])),
            }
        }
        let series: Vec<datasets::plot::Series<'_>> = series_data
            .iter()
            .map(|(n, p)| datasets::plot::Series {
                name: n,
                points: p.clone(),
            })
            .collect();
        let path = dir.join("hit_rate_vs_cache.png");
        datasets::plot::line_chart(
            &path,
            "Expert-cache hit rate (timing-honest)",
            "cache size (% of all experts)",
            "hit rate (%)",
            &series,
            None,
        )?;
        eprintln!("plot -> {}", path.display());
    }
    Ok(())
}
