//! Runs prompts through the offloading engine ([`crate::engine`]): experts read from
//! disk into a bounded cache, optional learned prefetch and cache-aware routing. The
//! same prompts also run with every expert in memory, to check that the engine (without
//! cache-aware routing) generates exactly the same tokens and to time the difference.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cache::EvictionPolicy;
use crate::engine::quality::{compare_routing, RoutingQuality};
use crate::engine::{EngineConfig, EngineReport, OffloadEngine, PairedEstimate};
use crate::planner::PrefetchBudget;
use indicatif::{ProgressBar, ProgressStyle};
use inference::generate::{generate, Sampling};
use inference::tokenizer::TextTokenizer;
use inference::{Checkpoint, ModelError, MoeModel};
use predictor::baselines::BaselineStats;
use predictor::{LoadedPredictor, OnlinePredictor};

use inference::prompts::Prompt;

use crate::cache::CacheSize;
use crate::OffloadError;

/// What to run.
#[derive(Debug, Clone)]
pub struct OffloadRunConfig {
    pub model_dir: PathBuf,
    pub prompts: Vec<Prompt>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub backend: inference::device::BackendKind,
    pub add_special_tokens: bool,
    pub cache: CacheSize,
    pub policy: EvictionPolicy,
    /// A trained predictor directory: learned prefetch.
    pub predictor: Option<PathBuf>,
    /// A predictor directory whose token table prefetches at each token's start.
    pub token_table: Option<PathBuf>,
    /// A predictor directory or a trace whose counts start the online blend.
    pub blend: Option<PathBuf>,
    /// Experts prefetched per forecast layer, or `Auto`: planned against the measured
    /// link (twice top-k candidates per layer, each read only when it pays).
    pub budget: PrefetchBudget,
    /// With `Auto`: measure decode steps with and without planned prefetch and keep the
    /// faster ([`crate::engine::PrefetchGuard`]).
    pub prefetch_guard: bool,
    /// Measure prefetch inside the run: on and off in alternate windows of this many
    /// decode steps (instead of the guard; tokens/s then mixes both settings).
    pub alternate_prefetch: Option<usize>,
    /// With a lookahead predictor, also forecast the next layers after each layer.
    pub layer_forecasts: bool,
    /// Prefetch each layer's pre-attention-gate experts at the layer's start.
    pub pre_attention: bool,
    /// Prefetch the next token's first-layer experts forecast by the logit lens.
    pub lens: bool,
    /// Cache-aware routing margin; 0 = off.
    pub routing_margin: f32,
    pub loader_threads: usize,
    /// Chunks of one demand read in flight at once.
    pub read_streams: usize,
    /// Also run every prompt with all experts in memory (identity check, reference speed).
    pub compare_in_memory: bool,
    /// Held-out text prompts for the cache-aware routing quality check.
    pub quality: Vec<Prompt>,
    /// Instead of generating the prompts: replay this trace's sequences, each token's
    /// routing forced to the recorded experts (the model computes everything else).
    pub replay: Option<PathBuf>,
    /// With `replay`: at most this many tokens (0: all).
    pub replay_tokens: usize,
    /// With `replay`: the oracle prefetcher, reading the recorded experts this many
    /// layers ahead (the bound on what any forecaster can gain).
    pub oracle_lead: Option<usize>,
    /// With `oracle_lead` and `Auto`: the oracle's reads go to the planner as certain
    /// forecasts (what the planner loses with perfect forecasts).
    pub oracle_planned: bool,
}

/// What a run produced and measured.
#[derive(Debug, Clone)]
pub struct OffloadRun {
    pub report: EngineReport,
    /// Generated token ids per prompt, and their text when a tokenizer exists.
    pub generated: Vec<Vec<u32>>,
    pub texts: Vec<Option<String>>,
    /// With `compare_in_memory`: whether every prompt generated the same tokens, and the
    /// in-memory decode throughput.
    pub identical: Option<bool>,
    pub in_memory_tokens_per_s: Option<f64>,
    pub quality: Option<RoutingQuality>,
    /// What a replay ran (with `replay`).
    pub replay: Option<crate::replay::ReplaySummary>,
}

/// Loads the model, offloads its experts and generates every prompt through the engine.
pub fn run_offloaded(cfg: &OffloadRunConfig) -> Result<OffloadRun, OffloadError> {
    if cfg.oracle_planned && (cfg.oracle_lead.is_none() || cfg.budget != PrefetchBudget::Auto) {
        return Err(ModelError::Input(
            "--plan-oracle offers the oracle's reads to the planner: it needs --oracle-prefetch LEAD and --prefetch-budget auto".into(),
        )
        .into());
    }
    if cfg.oracle_lead.is_some() && cfg.replay.is_none() {
        return Err(ModelError::Input(
            "the oracle prefetcher reads a recorded trace's routing: it needs --replay".into(),
        )
        .into());
    }
    let device = cfg.backend.device();
    let mut ck = Checkpoint::open(&cfg.model_dir)?;
    // The all-in-memory model is loaded only when something compares against it;
    // otherwise the routed experts never leave the disk except through the engine.
    let compare = cfg.replay.is_none() && (cfg.compare_in_memory || !cfg.quality.is_empty());
    let reference = if compare {
        Some(MoeModel::load(&ck, &device)?)
    } else {
        None
    };
    let mut offloaded = match &reference {
        Some(r) => r.clone(),
        None => {
            ck.skip_routed_experts();
            MoeModel::load(&ck, &device)?
        }
    };
    let shape = offloaded.shape();
    let total = shape.moe_layers.len() * shape.n_experts;
    let needs_tokenizer = cfg
        .prompts
        .iter()
        .chain(&cfg.quality)
        .any(|p| matches!(p, Prompt::Text { .. }));
    let tokenizer = if needs_tokenizer || cfg.model_dir.join("tokenizer.json").exists() {
        Some(TextTokenizer::load(&cfg.model_dir)?)
    } else {
        None
    };
    let ids = |prompts: &[Prompt]| -> Result<Vec<Vec<u32>>, OffloadError> {
        prompts
            .iter()
            .map(|p| {
                p.token_ids(tokenizer.as_ref(), cfg.add_special_tokens, shape.vocab_size)
                    .map_err(|source| ModelError::in_prompt(p.name(), source).into())
            })
            .collect()
    };
    let prompts = ids(&cfg.prompts)?;
    let online = match &cfg.predictor {
        Some(dir) => Some(OnlinePredictor::new(LoadedPredictor::load(dir, &device)?)),
        None => None,
    };
    let engine_cfg = EngineConfig {
        capacity: cfg.cache.experts(total),
        policy: cfg.policy,
        budget: match cfg.budget {
            PrefetchBudget::Auto => 2 * shape.top_k,
            PrefetchBudget::PerLayer(n) => n,
        },
        planned: cfg.budget == PrefetchBudget::Auto,
        prefetch_guard: cfg.prefetch_guard,
        alternate_prefetch: cfg.alternate_prefetch,
        layer_forecasts: cfg.layer_forecasts,
        pre_attention: cfg.pre_attention,
        lens: cfg.lens,
        routing_margin: cfg.routing_margin,
        loader_threads: cfg.loader_threads,
        read_streams: cfg.read_streams,
        token_table: match &cfg.token_table {
            Some(dir) => Some(token_table(dir)?),
            None => None,
        },
        blend: match &cfg.blend {
            Some(path) => Some(blend_counts(path, &shape)?),
            None => None,
        },
        oracle_lead: cfg.oracle_lead,
        oracle_planned: cfg.oracle_planned,
        plan_timings: None,
    };
    let mut engine = OffloadEngine::new(&ck, &mut offloaded, engine_cfg, online, &device)?;
    if let Some(path) = &cfg.replay {
        let summary =
            crate::replay::replay_trace(path, &offloaded, &mut engine, cfg.replay_tokens)?;
        return Ok(OffloadRun {
            report: engine.report().clone(),
            generated: Vec::new(),
            texts: Vec::new(),
            identical: None,
            in_memory_tokens_per_s: None,
            quality: None,
            replay: Some(summary),
        });
    }

    let bar = ProgressBar::new(prompts.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} prompts  {msg}  [{elapsed_precise}]")
            .expect("static template"),
    );
    let mut generated = Vec::new();
    for (p, prompt) in cfg.prompts.iter().zip(&prompts) {
        engine.new_request();
        let g = generate(
            &offloaded,
            prompt,
            cfg.max_new_tokens,
            &cfg.sampling,
            None,
            &mut engine,
        )
        .map_err(|source| ModelError::in_prompt(p.name(), source))?;
        generated.push(g.generated);
        let r = engine.report();
        bar.set_message(format!(
            "{:.1} tokens/s, hit rate {:.1}%",
            r.tokens_per_s(),
            100.0 * r.hit_rate()
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let report = engine.report().clone();

    let (mut identical, mut in_memory_tokens_per_s) = (None, None);
    if let (true, Some(reference)) = (cfg.compare_in_memory, &reference) {
        let (mut same, mut decode_s, mut decode_tokens) = (true, 0f64, 0usize);
        for (prompt, out) in prompts.iter().zip(&generated) {
            let mut timer = DecodeTimer::default();
            let g = generate(
                reference,
                prompt,
                cfg.max_new_tokens,
                &cfg.sampling,
                None,
                &mut timer,
            )?;
            same &= g.generated == *out;
            decode_s += timer.decode_s;
            decode_tokens += timer.decode_tokens;
        }
        identical = Some(same);
        in_memory_tokens_per_s = Some(decode_tokens as f64 / decode_s.max(1e-12));
    }
    let quality = match (&reference, cfg.quality.is_empty()) {
        (Some(reference), false) => Some(compare_routing(
            reference,
            &offloaded,
            &mut engine,
            &ids(&cfg.quality)?,
        )?),
        _ => None,
    };
    let texts = generated
        .iter()
        .map(|g| tokenizer.as_ref().and_then(|t| t.decode(g).ok()))
        .collect();
    Ok(OffloadRun {
        report,
        generated,
        texts,
        identical,
        in_memory_tokens_per_s,
        quality,
        replay: None,
    })
}

/// The token-table counts of the predictor directory `dir`.
fn token_table(dir: &Path) -> Result<BaselineStats, OffloadError> {
    let pd = predictor::PredictorDir::new(dir.to_path_buf());
    let stats = pd.read_counts()?;
    if !stats.has_token_table() {
        return Err(inference::ModelError::Input(format!(
            "{}: its baselines have no token table (trained before it); retrain the predictor",
            pd.baselines_file().display()
        ))
        .into());
    }
    Ok(stats)
}

/// The counts that start the online blend ([`predictor::blend::load_counts`]); they must
/// be of `model`'s routing.
fn blend_counts(path: &Path, model: &inference::ModelShape) -> Result<BaselineStats, OffloadError> {
    let counts = predictor::blend::load_counts(path, model.moe_layers.len())?;
    if let Some(d) = crate::engine::routing_mismatch(counts.shape, model) {
        return Err(ModelError::file(path, format!("--blend: its counts are of {d}")).into());
    }
    Ok(counts)
}

/// Times the decode steps of an in-memory run (same accounting as the engine's).
#[derive(Default)]
struct DecodeTimer {
    started: Option<Instant>,
    decoding: bool,
    decode_s: f64,
    decode_tokens: usize,
}

impl inference::RoutingObserver for DecodeTimer {
    fn on_routing(&mut self, _: usize, _: usize, _: &[inference::RouteDecision]) {}

    fn on_forward(&mut self, first_pos: usize, tokens: &[u32]) {
        self.decoding = inference::generate::is_decode_step(first_pos, tokens.len());
        self.started = Some(Instant::now());
    }

    fn on_forward_done(&mut self) -> inference::Result<()> {
        if let (true, Some(t)) = (self.decoding, self.started) {
            self.decode_s += t.elapsed().as_secs_f64();
            self.decode_tokens += 1;
        }
        Ok(())
    }
}

impl OffloadRun {
    /// Notes and warnings for the user (what a replay could not force).
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(s) = &self.replay {
            out.extend(s.notes.iter().map(|n| format!("note: {n}")));
            if s.unforced > 0 {
                out.push(format!(
                    "warning: {} routings could not be forced to the trace",
                    s.unforced
                ));
            }
        }
        out
    }

    /// The run's measurements as `moecast run` prints them (`prompts`: how many were run).
    pub fn summary(&self, prompts: usize) -> String {
        let r = &self.report;
        let mb = |b: u64| b as f64 / 1e6;
        let what = match &self.replay {
            Some(s) => format!("replayed {} sequences ({} tokens)", s.sequences, s.tokens),
            None => format!("{prompts} prompts"),
        };
        let mut out = format!(
            "{what}: {} prompt + {} decode tokens; cache {} of {} experts, policy {}, prefetch {} (budget {})\n",
            r.prompt_tokens, r.decode_tokens, r.capacity, r.total_experts, r.policy, r.prefetch, r.budget
        );
        if let Some(c) = &r.planner {
            out += &format!(
                "planner: {} candidates offered, {} read, {} would land too late, {} not worth their read, {} cancelled (their layer routed elsewhere, or a newer forecast ranked them out)\n",
                c.offered, c.issued, c.late, c.not_worth, c.cancelled
            );
        }
        if let Some(p) = &r.planner_state {
            out += &format!(
                "planner learned: {:.2} ms per expert read, {:.2} ms between lookups, {:.2} demand reads per lookup, entries live {:.1} lookups, {:.0}% of experts evicted for a prefetch needed again soon{}{}\n",
                p.read_us / 1e3,
                p.layer_period_us / 1e3,
                p.misses_per_lookup,
                p.entry_lifetime_lookups,
                100.0 * p.background_probability,
                match p.wrong_read_load {
                    Some(load) => format!(", a wrong read charged at a link load of {load:.2}"),
                    None => String::new(),
                },
                match (p.offered_probability, p.calibrated_probability) {
                    (Some(said), Some(used)) => format!(
                        "; forecasts said {:.0}%, {:.0}% were used",
                        100.0 * said,
                        100.0 * used
                    ),
                    _ => String::new(),
                }
            );
        }
        if r.alternate_window > 0 {
            out += &format!(
                "prefetch alternated on and off every {} decode steps ({} of {} without it): tokens/s below mixes both\n",
                r.alternate_window, r.prefetch_off_tokens, r.decode_tokens
            );
        } else if r.prefetch_off_tokens > 0 {
            out += &format!(
                "prefetch guard: {} of {} decode steps without prefetch (measured not to pay, or measuring that)\n",
                r.prefetch_off_tokens, r.decode_tokens
            );
        }
        match r.paired_prefetch() {
            Some(p) if p.conclusive() => {
                out += &format!(
                    "prefetch measured inside this run: steps without it took {:.2}x as long as with it ({:.2}-{:.2}; {} windows without it, each against the windows with it on either side)\n",
                    p.mean, p.lowest, p.highest, p.pairs
                );
            }
            Some(p) => {
                out += &format!(
                    "prefetch measured inside this run: too few windows without it to tell ({} of the {} needed; {:.2}x from what it has)\n",
                    p.pairs,
                    PairedEstimate::CONCLUSIVE_PAIRS,
                    p.mean
                );
            }
            None => {}
        }
        out += &format!(
            "decode: {:.1} tokens/s, hit rate {:.1}% ({} hits, {} late, {} misses of {} lookups), stall {:.2} ms/token ({:.2} s)\n",
            r.tokens_per_s(), 100.0 * r.hit_rate(), r.hits, r.late, r.misses, r.accesses, r.stall_ms_per_token(), r.stall_s
        );
        out += &format!(
            "reads from disk ({}): {} on demand ({:.1} MB), {} prefetched ({:.1} MB with {} stopped part-read; {} used, {} evicted unused on arrival); loader busy {:.2} s\n",
            if r.direct_io { "direct I/O" } else { "page cache dropped" },
            r.demand_reads, mb(r.bytes_demand), r.prefetch_reads, mb(r.bytes_prefetch), r.stopped_reads, r.useful_prefetches, r.wasted_reads, r.read_s
        );
        if r.wasted_demand_reads > 0 {
            out += &format!(
                "{} demand reads arrived after their expert was evicted (read again)\n",
                r.wasted_demand_reads
            );
        }
        if r.routings > 0 {
            out += &format!(
                "cache-aware routing (margin {}): changed {} of {} token-layer routings ({:.1}%)\n",
                r.routing_margin,
                r.rerouted,
                r.routings,
                100.0 * r.rerouted as f64 / r.routings as f64
            );
        }
        if let (Some(same), Some(tps)) = (self.identical, self.in_memory_tokens_per_s) {
            out += &format!(
                "all experts in memory: {tps:.1} tokens/s; generated tokens identical to the engine's: {}\n",
                if same { "yes" } else { "no" }
            );
        }
        if let Some(q) = &self.quality {
            out += &format!(
                "quality on {} held-out positions: next-token agreement {:.2}%, perplexity {:.3} -> {:.3} ({:+.2}%)\n",
                q.positions,
                100.0 * q.agreement,
                q.perplexity_reference,
                q.perplexity_engine,
                q.perplexity_delta_pct()
            );
        }
        out
    }

    /// The measurements as `--json` writes them.
    pub fn to_json(&self) -> serde_json::Value {
        let r = &self.report;
        serde_json::json!({
            "report": r,
            "tokens_per_s": r.tokens_per_s(),
            "hit_rate": r.hit_rate(),
            "identical_to_in_memory": self.identical,
            "in_memory_tokens_per_s": self.in_memory_tokens_per_s,
            "quality": self.quality,
            "generated": self.generated,
        })
    }
}
