//! `moecast run`: generation through the offloading engine.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompts", "replay"])))]
pub(crate) struct RunArgs {
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// One prompt (text).
    #[arg(long)]
    prompt: Option<String>,
    /// Prompt file: .txt (one per line) or .jsonl, as for `collect`.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Instead of prompts: replay a recorded trace (any storage form). The model
    /// computes every token of its sequences, each MoE layer's routing forced to the
    /// recorded experts, so the engine is measured with that routing at this
    /// checkpoint's expert size (see `moecast checkpoint synth`).
    #[arg(long)]
    replay: Option<PathBuf>,
    /// With --replay: at most this many tokens (0: all).
    #[arg(long, default_value_t = 0)]
    replay_tokens: usize,
    /// With --replay: the oracle prefetcher, which reads each layer's recorded experts
    /// LEAD layers before it routes (counting on into the next token; at most one token),
    /// in full and unplanned. Not a forecaster: the bound the others are measured
    /// against (as `simulate --prefetch oracle`).
    #[arg(long, value_name = "LEAD", requires = "replay")]
    oracle_prefetch: Option<usize>,
    /// With --oracle-prefetch: offer the oracle's reads to the planner as certain
    /// forecasts (probability 1) instead of reading them in full: a forecaster that is
    /// never wrong, so what it gains short of the oracle is the planner's loss.
    #[arg(long, requires = "oracle_prefetch")]
    plan_oracle: bool,
    /// Resident experts: N, or P% of all routed experts.
    #[arg(long, default_value = "25%")]
    expert_cache: String,
    /// Eviction policy: lru, lfu, lfu:DECAY, lfu-kept, lfu-kept:TOKENS or next-use (next use estimated from the layer cycle and reuse gaps).
    #[arg(long, default_value = "lru")]
    policy: String,
    /// Trained predictor directory (`moecast train -o DIR`): learned prefetch.
    #[arg(long)]
    predictor: Option<PathBuf>,
    /// A predictor directory whose token table (its training traces' per-token-id expert
    /// counts) prefetches, at each token's start, every layer's most frequent experts for
    /// that id. Alone or beside --predictor (both prefetch).
    #[arg(long)]
    token_table: Option<PathBuf>,
    /// The online blend, for models without a trained predictor: after each layer
    /// routes, the next layers' experts are forecast from co-activation counts, the last
    /// two tokens' experts and the request's use, weighed by a logistic model that learns
    /// while decoding. Its counts start as those of PATH: a predictor directory, or a
    /// trace (counts fitted on all of it); they then take in every routed token. Alone or
    /// beside --predictor / --token-table (all prefetch).
    #[arg(long, value_name = "PATH")]
    blend: Option<PathBuf>,
    /// Prefetch budget: `auto` (planned against the measured link: each forecast expert
    /// is read only when its calibrated probability pays for the read, queued reads of a
    /// layer that routed elsewhere are cancelled) or N (the best N experts of every
    /// forecast layer).
    #[arg(long, default_value = "auto")]
    prefetch_budget: String,
    /// With `--prefetch-budget auto`, do not measure decode steps with and without
    /// planned prefetch (the guard keeps prefetch on unless steps without it are more
    /// than 2% faster, in windows of 8 steps after a first one that fills the cache;
    /// the setting not in use is measured again after 6 windows, the wait doubling each
    /// time the setting in use holds, and the setting follows the mean of the last 8
    /// such comparisons).
    #[arg(long)]
    no_prefetch_guard: bool,
    /// Measure prefetch inside this run: run it on and off in alternate windows of N
    /// decode steps, 2 or more (no guard; the first window warms the cache, the first
    /// step after each switch is not measured) and print how much longer steps without
    /// it took, each window without it against the windows with it on either side.
    /// Separate runs see a disk's speed drift by more than prefetch's effect; this pairs
    /// them within minutes. Tokens/s then mixes both settings. Any prefetcher, fixed or planned.
    #[arg(long, value_name = "N")]
    alternate_prefetch: Option<usize>,
    /// With a lookahead predictor, also forecast the next layers after each layer (more
    /// hits, one predictor query per layer on the decode thread).
    #[arg(long)]
    layer_forecasts: bool,
    /// Prefetch each layer's pre-attention-gate experts (the layer's gate on its input
    /// before attention) at the layer's start, to arrive while attention runs.
    #[arg(long)]
    pre_attention: bool,
    /// After each token's last MoE layer routes, prefetch the next token's first-layer
    /// experts forecast by the logit lens (the LM head read at that layer's router input;
    /// with --predictor, its candidates' layer-0 routing refined by the predictor's
    /// per-token counts).
    #[arg(long)]
    lens: bool,
    /// Cache-aware routing: prefer a resident expert whose router score is within MARGIN
    /// of a chosen one (softmax-probability units for softmax routers). Off by default.
    #[arg(long, default_value_t = 0.0)]
    cache_aware_routing: f32,
    /// Held-out text (one sequence per line) on which cache-aware routing's quality cost is
    /// measured: next-token agreement and perplexity against unmodified routing.
    #[arg(long)]
    quality: Option<PathBuf>,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Background threads reading experts from disk (with planned prefetch one is kept
    /// for demand reads; the others read prefetches side by side).
    #[arg(long, default_value_t = offload::engine::DEFAULT_LOADER_THREADS)]
    loader_threads: usize,
    /// Chunks of one demand read in flight at once (its queue depth; 1: one after
    /// another). Prefetches read one chunk at a time.
    #[arg(long, default_value_t = offload::engine::DEFAULT_READ_STREAMS)]
    read_streams: usize,
    /// Skip the all-in-memory reference run (identity check and reference speed).
    #[arg(long)]
    no_compare: bool,
    /// Print each generated text.
    #[arg(long)]
    show_text: bool,
    /// Compute backend: flex (default), ndarray (`--features ndarray` builds), wgpu, cuda / cuda:N (`--features wgpu` / `cuda` builds).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Also write the measurements as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub(crate) fn run(a: RunArgs) -> Result<()> {
    let prompts = match (&a.prompt, &a.prompts) {
        (Some(text), _) => vec![collector::Prompt::Text {
            name: "prompt".into(),
            text: text.clone(),
        }],
        (None, Some(p)) => collector::read_prompts(p)?,
        (None, None) if a.replay.is_some() => Vec::new(),
        (None, None) => bail!("pass --prompt TEXT, --prompts FILE or --replay TRACE"),
    };
    let quality = match &a.quality {
        Some(p) => collector::read_prompts(p)?,
        None => Vec::new(),
    };
    if a.quality.is_some() && a.cache_aware_routing <= 0.0 {
        eprintln!(
            "note: --quality without --cache-aware-routing compares unmodified routing with itself"
        );
    }
    let sampling = inference::generate::Sampling::from_temperature(a.temperature, a.seed);
    let cfg = offload::OffloadRunConfig {
        model_dir: a.model,
        prompts,
        max_new_tokens: a.max_new_tokens,
        sampling,
        backend: a.device.parse().map_err(anyhow::Error::msg)?,
        add_special_tokens: false,
        cache: a.expert_cache.parse().map_err(anyhow::Error::msg)?,
        policy: a.policy.parse().map_err(anyhow::Error::msg)?,
        predictor: a.predictor,
        token_table: a.token_table,
        blend: a.blend,
        budget: a
            .prefetch_budget
            .parse()
            .map_err(|e| anyhow::anyhow!("--prefetch-budget: {e}"))?,
        prefetch_guard: !a.no_prefetch_guard,
        alternate_prefetch: a.alternate_prefetch,
        layer_forecasts: a.layer_forecasts,
        pre_attention: a.pre_attention,
        lens: a.lens,
        routing_margin: a.cache_aware_routing,
        loader_threads: a.loader_threads,
        read_streams: a.read_streams,
        compare_in_memory: !a.no_compare,
        quality,
        replay: a.replay.clone(),
        replay_tokens: a.replay_tokens,
        oracle_lead: a.oracle_prefetch,
        oracle_planned: a.plan_oracle,
    };
    let out = offload::run_offloaded(&cfg)?;
    if a.show_text {
        for (p, t) in cfg.prompts.iter().zip(&out.texts) {
            println!(
                "[{}] {}",
                p.name(),
                t.as_deref().unwrap_or("(no tokenizer)")
            );
        }
    }
    for note in out.notes() {
        eprintln!("{note}");
    }
    print!("{}", out.summary(cfg.prompts.len()));
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&out.to_json())?;
        predictor::state::write_atomic(path, json.as_bytes())?;
    }
    Ok(())
}

/// `moecast compare-runs`: reports of `moecast run --json` side by side.
#[derive(Args)]
pub(crate) struct CompareArgs {
    /// Reports written by `moecast run --json` (runs of one mode are averaged).
    #[arg(required = true)]
    reports: Vec<PathBuf>,
    /// Also draw a bar chart per cache size into this directory (engine-cache-N.png).
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub(crate) fn compare(a: CompareArgs) -> Result<()> {
    print!(
        "{}",
        offload::engine::compare::compare_runs(&a.reports, a.plot.as_deref())?
    );
    Ok(())
}
