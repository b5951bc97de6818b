//! Trace collection: runs an MoE checkpoint over prompts (prefill + decode) with the
//! native runtime and records every MoE layer's routing as a [`datasets::RoutingTrace`].
//!
//! Sequences are streamed to a journal (`OUT.partial.jsonl`, interchange JSONL) as each
//! finishes, so a crash or Ctrl-C loses at most the sequence being collected: the same
//! command resumes the journal. On success the journal is converted to `OUT` atomically
//! and removed.

mod journal;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use datasets::channel::{PRE_ATTENTION_LOGITS, ROUTER_INPUTS, ROUTER_LOGITS};
use datasets::{Channel, Phase, TokenRecord, TraceMeta};
use indicatif::{ProgressBar, ProgressStyle};
use inference::generate::{generate, Sampling};
use inference::tokenizer::TextTokenizer;
use inference::{Checkpoint, MoeModel, RouteDecision, RoutingObserver};

pub use inference::prompts::{parse_token_ids, read_prompts, Prompt};

/// Errors of a collection run.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Model(#[from] inference::ModelError),
    #[error(transparent)]
    Trace(#[from] datasets::TraceError),
    /// A channel that cannot be recorded was asked for.
    #[error("{0}")]
    Channel(String),
}

/// What to collect.
#[derive(Debug, Clone)]
pub struct CollectConfig {
    pub model_dir: PathBuf,
    pub prompts: Vec<Prompt>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Sequences sampled per prompt (at least 1). With more than one, sequence `j` of a
    /// prompt is named `NAME#sJ`; every sequence gets its own sampler seed.
    pub samples: usize,
    pub backend: inference::device::BackendKind,
    /// Add the tokenizer's special tokens (BOS) to text prompts.
    pub add_special_tokens: bool,
    /// Channels to record beside the routing (see [`RECORDABLE`]).
    pub channels: Vec<String>,
    pub output: PathBuf,
}

/// What a collection run did.
#[derive(Debug, Clone)]
pub struct CollectSummary {
    /// Sequences in the trace, those kept from an interrupted run's journal included.
    pub sequences: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    /// Sequences kept from the journal of an interrupted run (not collected again).
    pub resumed_sequences: usize,
    /// Tokens of those sequences.
    pub resumed_tokens: usize,
    pub seconds: f64,
}

impl CollectSummary {
    /// Tokens forwarded by this run per second (kept ones not counted).
    pub fn tokens_per_second(&self) -> f64 {
        (self.prefill_tokens + self.decode_tokens).saturating_sub(self.resumed_tokens) as f64
            / self.seconds.max(1e-9)
    }
}

/// The channels `moecast collect` can record, with the runtime's report each comes
/// from: the router's input (f16), its logits, and the pre-attention gate's logits.
pub const RECORDABLE: [&str; 3] = [ROUTER_INPUTS, ROUTER_LOGITS, PRE_ATTENTION_LOGITS];

/// One recorded channel: its values per (position, model layer).
type ChannelRows = BTreeMap<(usize, usize), Vec<f32>>;

/// Records each (position, model layer) decision of one sequence, and the rows of each
/// channel in `channels` (keyed by channel name).
#[derive(Default)]
struct SequenceRecorder {
    seen: BTreeMap<(usize, usize), RouteDecision>,
    channels: BTreeMap<String, ChannelRows>,
}

impl SequenceRecorder {
    /// A recorder of `channels` (names from [`RECORDABLE`]).
    fn new(channels: &[String]) -> Self {
        SequenceRecorder {
            channels: channels
                .iter()
                .map(|c| (c.clone(), ChannelRows::new()))
                .collect(),
            ..Default::default()
        }
    }

    fn wants(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    /// Stores `[T, width]` rows of `channel` for `layer` at positions `first_pos..`.
    fn store(&mut self, channel: &str, layer: usize, first_pos: usize, rows: &[f32], width: usize) {
        if let Some(map) = self.channels.get_mut(channel) {
            for (i, row) in rows.chunks_exact(width).enumerate() {
                map.insert((first_pos + i, layer), row.to_vec());
            }
        }
    }
}

impl RoutingObserver for SequenceRecorder {
    fn on_routing(&mut self, layer: usize, first_pos: usize, decisions: &[RouteDecision]) {
        for (i, d) in decisions.iter().enumerate() {
            self.seen.insert((first_pos + i, layer), d.clone());
        }
    }

    fn wants_router_inputs(&self, _layer: usize) -> bool {
        self.wants(ROUTER_INPUTS)
    }

    fn on_router_inputs(&mut self, layer: usize, first_pos: usize, inputs: &[f32], hidden: usize) {
        self.store(ROUTER_INPUTS, layer, first_pos, inputs, hidden);
    }

    fn wants_router_logits(&self) -> bool {
        self.wants(ROUTER_LOGITS)
    }

    fn on_router_logits(&mut self, layer: usize, first_pos: usize, logits: &[f32], e: usize) {
        self.store(ROUTER_LOGITS, layer, first_pos, logits, e);
    }

    fn wants_pre_attention_logits(&self) -> bool {
        self.wants(PRE_ATTENTION_LOGITS)
    }

    fn on_pre_attention_logits(
        &mut self,
        layer: usize,
        first_pos: usize,
        logits: &[f32],
        e: usize,
    ) {
        self.store(PRE_ATTENTION_LOGITS, layer, first_pos, logits, e);
    }
}

/// Path of the journal kept beside `output` while collecting.
pub fn journal_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".partial.jsonl");
    output.with_file_name(name)
}

/// The channel `name` (one of [`RECORDABLE`]) sized for a model of `shape`.
pub fn recordable_channel(name: &str, shape: &inference::ModelShape) -> Option<Channel> {
    match name {
        ROUTER_INPUTS => Some(Channel::router_inputs(shape.hidden_size as u32)),
        ROUTER_LOGITS => Some(Channel::router_logits(shape.n_experts as u32)),
        PRE_ATTENTION_LOGITS => Some(Channel::pre_attention_logits(shape.n_experts as u32)),
        _ => None,
    }
}

/// The trace meta of a loaded model, carrying the [`RECORDABLE`] channels named in
/// `channels` (in that order).
pub fn trace_meta(
    model_dir: &Path,
    model: &MoeModel,
    ck: &Checkpoint,
    channels: &[String],
) -> TraceMeta {
    let s = model.shape();
    let expert_bytes: Option<Vec<u64>> = s
        .moe_layers
        .iter()
        .map(|&l| ck.expert_bytes(l, s.n_experts))
        .collect();
    TraceMeta {
        model: model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| model_dir.display().to_string()),
        architecture: Some(s.model_type.clone()),
        n_layers: s.n_layers as u32,
        moe_layers: s.moe_layers.iter().map(|&l| l as u32).collect(),
        n_experts: s.n_experts as u32,
        top_k: s.top_k as u32,
        n_shared_experts: s.n_shared_experts as u32,
        source: Some("moecast collect".into()),
        tokenizer: model_dir
            .join("tokenizer.json")
            .exists()
            .then(|| format!("{}/tokenizer.json", model_dir.display())),
        ranked: true,
        expert_bytes,
        channels: RECORDABLE
            .iter()
            .filter(|c| channels.iter().any(|n| n == *c))
            .filter_map(|c| recordable_channel(c, &s))
            .collect(),
    }
}

/// Runs every prompt and writes the trace to `cfg.output`.
pub fn collect(cfg: &CollectConfig) -> Result<CollectSummary, CollectError> {
    let start = Instant::now();
    if let Some(c) = cfg
        .channels
        .iter()
        .find(|c| !RECORDABLE.contains(&c.as_str()))
    {
        return Err(CollectError::Channel(format!(
            "cannot record channel '{c}' (recordable: {})",
            RECORDABLE.join(", ")
        )));
    }
    let ck = Checkpoint::open(&cfg.model_dir)?;
    let model = MoeModel::load(&ck, &cfg.backend.device())?;
    let needs_tokenizer = cfg.prompts.iter().any(|p| matches!(p, Prompt::Text { .. }));
    let tokenizer = if needs_tokenizer {
        Some(TextTokenizer::load(&cfg.model_dir)?)
    } else {
        None
    };
    let meta = trace_meta(&cfg.model_dir, &model, &ck, &cfg.channels);
    let journal = journal_path(&cfg.output);
    let runs = sequence_runs(cfg);
    let vocab_size = model.shape().vocab_size;
    let (mut w, resumed) = journal::open(
        &journal,
        &meta,
        &journal::RunSettings::of(cfg),
        runs.len(),
        |i| {
            let ids = cfg.prompts[runs[i].0].token_ids(
                tokenizer.as_ref(),
                cfg.add_special_tokens,
                vocab_size,
            )?;
            Ok((runs[i].1.clone(), ids))
        },
    )?;

    let mut summary = CollectSummary {
        sequences: resumed.sequences,
        prefill_tokens: resumed.prefill_tokens,
        decode_tokens: resumed.decode_tokens,
        resumed_sequences: resumed.sequences,
        resumed_tokens: resumed.prefill_tokens + resumed.decode_tokens,
        seconds: 0.0,
    };
    let run = run_prompts(
        cfg,
        &runs,
        &model,
        tokenizer.as_ref(),
        &mut w,
        &journal,
        &mut summary,
        start,
    );
    drop(w);
    if let Err(e) = run {
        if summary.sequences == 0 {
            let _ = std::fs::remove_file(&journal);
        }
        return Err(e);
    }
    let trace = datasets::jsonl::read_jsonl(&journal)?;
    datasets::save_trace(&trace, &cfg.output, None)?;
    std::fs::remove_file(&journal).map_err(|e| datasets::TraceError::io(&journal, e))?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Every sequence of a run in order: its prompt's index and its name (`NAME#sJ` with
/// more than one sample per prompt).
fn sequence_runs(cfg: &CollectConfig) -> Vec<(usize, String)> {
    let samples = cfg.samples.max(1);
    cfg.prompts
        .iter()
        .enumerate()
        .flat_map(|(p, prompt)| {
            (0..samples).map(move |j| {
                let name = if samples > 1 {
                    format!("{}#s{j}", prompt.name())
                } else {
                    prompt.name().to_string()
                };
                (p, name)
            })
        })
        .collect()
}

/// Runs the sequences one by one after those the journal kept, appending each finished
/// one to the journal. Sequence `i` samples with seed `seed + i`.
#[allow(clippy::too_many_arguments)]
fn run_prompts(
    cfg: &CollectConfig,
    runs: &[(usize, String)],
    model: &MoeModel,
    tokenizer: Option<&TextTokenizer>,
    w: &mut BufWriter<File>,
    journal: &Path,
    summary: &mut CollectSummary,
    start: Instant,
) -> Result<(), CollectError> {
    let shape = model.shape();
    let io = |e: std::io::Error| datasets::TraceError::io(journal, e);
    let bar = ProgressBar::new(runs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} sequences  {msg}  [{elapsed_precise}]")
            .expect("static template"),
    );
    bar.set_position(summary.resumed_sequences as u64);
    for (i, (p, seq_name)) in runs.iter().enumerate().skip(summary.resumed_sequences) {
        let prompt = &cfg.prompts[*p];
        let seq_name = seq_name.clone();
        let ids = prompt.token_ids(tokenizer, cfg.add_special_tokens, shape.vocab_size)?;
        let sampling = match &cfg.sampling {
            Sampling::Temperature { temperature, seed } => Sampling::Temperature {
                temperature: *temperature,
                seed: seed.wrapping_add(i as u64),
            },
            greedy => greedy.clone(),
        };
        let mut rec = SequenceRecorder::new(&cfg.channels);
        let gen = generate(model, &ids, cfg.max_new_tokens, &sampling, None, &mut rec)
            .map_err(|source| inference::ModelError::in_prompt(prompt.name(), source))?;
        let all: Vec<u32> = gen.prompt.iter().chain(&gen.generated).copied().collect();
        for (pos, &token) in all.iter().enumerate() {
            let decisions: Vec<Option<&RouteDecision>> = shape
                .moe_layers
                .iter()
                .map(|&l| rec.seen.get(&(pos, l)))
                .collect();
            let channels = rec
                .channels
                .iter()
                .map(|(name, map)| {
                    let values = shape
                        .moe_layers
                        .iter()
                        .map(|&l| map.get(&(pos, l)).cloned())
                        .collect();
                    (name.clone(), values)
                })
                .collect();
            let record = TokenRecord {
                seq: seq_name.clone(),
                pos: pos as u32,
                phase: if pos < gen.prompt.len() {
                    Phase::Prefill
                } else {
                    Phase::Decode
                },
                token: Some(token),
                experts: decisions.iter().map(|d| d.map(|d| d.ids.clone())).collect(),
                weights: Some(
                    decisions
                        .iter()
                        .map(|d| d.map(|d| d.weights.clone()))
                        .collect(),
                ),
                channels,
            };
            serde_json::to_writer(&mut *w, &record).map_err(|e| io(e.into()))?;
            w.write_all(b"\n").map_err(io)?;
        }
        w.flush().map_err(io)?;
        summary.sequences += 1;
        summary.prefill_tokens += gen.prompt.len();
        summary.decode_tokens += gen.generated.len();
        summary.seconds = start.elapsed().as_secs_f64();
        bar.set_message(format!("{:.0} tokens/s", summary.tokens_per_second()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}
