//! `moecast simulate`: trace-driven expert-cache simulation.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use offload::simulate::study::{run_study, StudySettings};

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
    /// Eviction policies: lru, lfu, lfu:DECAY, lfu-kept, lfu-kept:TOKENS, next-use, belady; comma-separated.
    #[arg(long, default_value = "lru", value_delimiter = ',')]
    policy: Vec<String>,
    /// Prefetchers: none, previous, token, coactivation, blend, activation, gate, pre-attention, lens, learned, oracle; comma-separated (a+b: both).
    /// blend: co-activation, the last tokens' experts and the request's use weighed by
    /// a logistic model learned while decoding (no trained predictor needed).
    #[arg(long, default_value = "none", value_delimiter = ',')]
    prefetch: Vec<String>,
    /// Predictor directory (learned prefetch; its training baselines feed token,
    /// coactivation and blend, and its per-token first-layer counts refine the lens).
    #[arg(long)]
    predictor: Option<PathBuf>,
    /// The MoE checkpoint the trace comes from (gate prefetch: its gates applied to the
    /// trace's router inputs; pre-attention prefetch: the model replays the token ids,
    /// unless the trace was collected with --pre-attention-logits;
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
    /// Layers ahead for the coactivation, blend, activation, gate, learned and oracle prefetchers
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

pub(crate) fn simulate_cmd(a: SimulateArgs) -> Result<()> {
    // A dataset is replayed one memory-mapped shard at a time, each from a cold cache.
    let parts = crate::inputs::trace_files(std::slice::from_ref(&a.trace))?;
    let settings = StudySettings {
        trace: a.trace,
        parts,
        cache: a.cache,
        sweep: a.sweep,
        policy: a.policy,
        prefetch: a.prefetch,
        predictor: a.predictor,
        model: a.model,
        budget: a.budget,
        chunk_bytes: a.chunk_bytes,
        horizon: a.horizon,
        per_layer: a.per_layer,
        bandwidth: a.bandwidth,
        expert_bytes: a.expert_bytes,
        compute_us_per_layer: a.compute_us_per_layer,
        attention_us_per_layer: a.attention_us_per_layer,
        deadline_order: a.link_order == LinkOrder::Deadline,
    };
    let bar = crate::inputs::bar(settings.parts.len(), "parts");
    let study = run_study(&settings, |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    for note in &study.notes {
        eprintln!("note: {note}");
    }
    print!("{}", study.table());
    if let Some(path) = &a.json {
        let body = serde_json::to_string_pretty(&study.to_json())?;
        predictor::state::write_atomic(path, body.as_bytes())?;
        eprintln!("results -> {}", path.display());
    }
    if let Some(dir) = &a.plot {
        eprintln!("plot -> {}", study.plot(dir)?.display());
    }
    Ok(())
}
