//! The `moecast` command line: parses arguments and calls the library crates.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use datasets::import::{ImportFormat, ImportOptions};
use datasets::stats;
use datasets::synth::{synthetic_trace, SynthConfig};
use datasets::{open_trace, save_trace, TraceFormat};

#[derive(Parser)]
#[command(
    name = "moecast",
    version,
    about = "Predict which experts an MoE model will activate, and use it to run MoE models with a bounded expert cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Routing traces: import, convert, export, inspect, statistics.
    #[command(subcommand)]
    Trace(TraceCommand),
    /// Run an MoE checkpoint over prompts and record its routing as a trace.
    Collect(CollectArgs),
    /// Train a tiny MoE language model and write it as a Hugging Face checkpoint.
    #[command(subcommand)]
    Tinymoe(TinymoeCommand),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompts", "token_ids"])))]
struct CollectArgs {
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Prompt file: .txt (one prompt per line) or .jsonl ({"text": ...} or {"token_ids": [...]}).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// One prompt given as comma-separated token ids, e.g. "1,2,3".
    #[arg(long)]
    token_ids: Option<String>,
    /// Tokens to generate after each prompt.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed of the sampler (prompt i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Add the tokenizer's special tokens (BOS) to text prompts.
    #[arg(long)]
    add_special_tokens: bool,
    /// Compute backend: flex (default) or ndarray.
    #[arg(long, default_value = "flex")]
    device: String,
    /// Output trace: .mctrace, .parquet or .jsonl.
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(Subcommand)]
enum TraceCommand {
    /// Import traces emitted by an engine (format auto-detected unless --from).
    Import(ImportArgs),
    /// Convert a trace between .mctrace, .parquet and .jsonl (by output extension).
    Convert(ConvertArgs),
    /// Export a trace as interchange JSONL (stdout unless -o) or another form.
    Export(ExportArgs),
    /// Print a trace's metadata and storage layout.
    Info(InfoArgs),
    /// Trace statistics: popularity, overlap, reuse distance, co-activation, LRU hit rate.
    Stats(StatsArgs),
    /// Generate a seeded synthetic trace with tunable locality.
    Synth(SynthArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum FromFormat {
    RouteCsv,
    Warp,
    RouterTraceV2,
    Jsonl,
    HookJsonl,
}

impl From<FromFormat> for ImportFormat {
    fn from(f: FromFormat) -> Self {
        match f {
            FromFormat::RouteCsv => ImportFormat::RouteCsv,
            FromFormat::Warp => ImportFormat::Warp,
            FromFormat::RouterTraceV2 => ImportFormat::RouterTraceV2,
            FromFormat::Jsonl => ImportFormat::Jsonl,
            FromFormat::HookJsonl => ImportFormat::HookJsonl,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum StoreFormat {
    Binary,
    Parquet,
    Jsonl,
}

impl From<StoreFormat> for TraceFormat {
    fn from(f: StoreFormat) -> Self {
        match f {
            StoreFormat::Binary => TraceFormat::Binary,
            StoreFormat::Parquet => TraceFormat::Parquet,
            StoreFormat::Jsonl => TraceFormat::Jsonl,
        }
    }
}

#[derive(Args)]
struct ImportArgs {
    /// Input files; several files become one trace (same model shape required).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Input format (default: detected from the content).
    #[arg(long, value_enum)]
    from: Option<FromFormat>,
    /// Output trace: .mctrace, .parquet or .jsonl.
    #[arg(short, long)]
    output: PathBuf,
    /// Model name to record instead of the one found in the input.
    #[arg(long)]
    model: Option<String>,
    /// Experts per layer, for formats that do not record it.
    #[arg(long)]
    n_experts: Option<u32>,
}

#[derive(Args)]
struct ConvertArgs {
    /// Input trace (.mctrace, .parquet or .jsonl; detected from content).
    input: PathBuf,
    /// Output trace; the form is taken from the extension unless --format.
    #[arg(short, long)]
    output: PathBuf,
    /// Output form (overrides the extension).
    #[arg(long, value_enum)]
    format: Option<StoreFormat>,
}

#[derive(Args)]
struct ExportArgs {
    /// Input trace.
    input: PathBuf,
    /// Output form.
    #[arg(long, value_enum, default_value = "jsonl")]
    format: StoreFormat,
    /// Output file (default: stdout, JSONL only).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

#[derive(Args)]
struct InfoArgs {
    /// Trace (.mctrace, .parquet or .jsonl).
    input: PathBuf,
}

#[derive(Args)]
struct StatsArgs {
    /// Trace (.mctrace, .parquet or .jsonl).
    input: PathBuf,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Write PNG charts into this folder.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// LRU capacities in experts per layer (default: 10% and 25% of the experts).
    #[arg(long, value_delimiter = ',')]
    lru_capacity: Vec<u32>,
}

#[derive(Args)]
struct SynthArgs {
    /// Output trace: .mctrace, .parquet or .jsonl.
    #[arg(short, long)]
    output: PathBuf,
    /// MoE layers.
    #[arg(long, default_value_t = 8)]
    layers: u32,
    /// Experts per layer.
    #[arg(long, default_value_t = 32)]
    experts: u32,
    /// Experts chosen per token and layer.
    #[arg(long, default_value_t = 4)]
    top_k: u32,
    /// Number of sequences.
    #[arg(long, default_value_t = 16)]
    sequences: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Probability that an expert of the previous token is kept.
    #[arg(long, default_value_t = 0.3)]
    stickiness: f64,
    /// Random seed (same seed, same trace).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        if e.chain().any(is_broken_pipe) {
            std::process::exit(0);
        }
        eprintln!("error: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error and those of its causes whose text the message does not already hold
/// (library errors embed their source's text).
fn describe(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    msg
}

fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Trace(cmd) => match cmd {
            TraceCommand::Import(a) => import(a),
            TraceCommand::Convert(a) => convert(a),
            TraceCommand::Export(a) => export(a),
            TraceCommand::Info(a) => info(a),
            TraceCommand::Stats(a) => trace_stats(a),
            TraceCommand::Synth(a) => synth(a),
        },
        Command::Collect(a) => collect(a),
        Command::Tinymoe(TinymoeCommand::Train(a)) => tinymoe_train(*a),
    }
}

fn import(a: ImportArgs) -> Result<()> {
    let opts = ImportOptions {
        model: a.model,
        n_experts: a.n_experts,
    };
    let start = Instant::now();
    let imported = datasets::import::import(&a.inputs, a.from.map(Into::into), &opts)?;
    for note in &imported.notes {
        eprintln!("note: {note}");
    }
    save_trace(&imported.trace, &a.output, None)?;
    let t = &imported.trace;
    println!(
        "imported {} tokens in {} sequences ({} MoE layers x {} experts, top-{}) -> {} in {:.3}s",
        t.n_tokens(),
        t.seq_names.len(),
        t.meta.n_moe(),
        t.meta.n_experts,
        t.meta.top_k,
        a.output.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn convert(a: ConvertArgs) -> Result<()> {
    let trace = open_trace(&a.input)?.into_owned();
    save_trace(&trace, &a.output, a.format.map(Into::into))?;
    println!(
        "{} -> {} ({} tokens)",
        a.input.display(),
        a.output.display(),
        trace.n_tokens()
    );
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let trace = open_trace(&a.input)?.into_owned();
    match a.output {
        Some(out) => save_trace(&trace, &out, Some(a.format.into()))?,
        None => {
            if !matches!(a.format, StoreFormat::Jsonl) {
                bail!("only JSONL can go to stdout; pass -o FILE for binary or Parquet");
            }
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            datasets::jsonl::write_jsonl(&trace, &mut w)?;
            w.flush().context("writing to stdout")?;
        }
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let opened = open_trace(&a.input)?;
    let view = opened.view();
    println!("{}", serde_json::to_string_pretty(view.meta)?);
    println!(
        "tokens: {}  sequences: {}",
        view.n_tokens(),
        view.seq_names.len()
    );
    if let datasets::OpenedTrace::Mapped(m) = &opened {
        println!("binary form, {} bytes:", m.file_len());
        for s in m.sections() {
            println!(
                "  {:<8} {:>4} x {:>10} at {}",
                s.name, s.dtype, s.len, s.offset
            );
        }
    }
    Ok(())
}

fn trace_stats(a: StatsArgs) -> Result<()> {
    let opened = open_trace(&a.input)?;
    let view = opened.view();
    let caps = if a.lru_capacity.is_empty() {
        stats::default_lru_capacities(view.meta.n_experts, view.meta.top_k)
    } else {
        a.lru_capacity.clone()
    };
    if let Some(&c) = caps.iter().find(|&&c| c == 0 || c > view.meta.n_experts) {
        bail!("--lru-capacity {c} must be in 1..={}", view.meta.n_experts);
    }
    let s = stats::compute(&view, &caps);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", stats::render_table(&s));
    }
    if let Some(dir) = a.plot {
        let files = datasets::plot::plot_stats(&s, &dir)?;
        for f in files {
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(())
}

fn synth(a: SynthArgs) -> Result<()> {
    let cfg = SynthConfig {
        n_layers: a.layers,
        n_experts: a.experts,
        top_k: a.top_k,
        sequences: a.sequences,
        tokens_per_sequence: a.tokens,
        stickiness: a.stickiness,
        seed: a.seed,
        ..SynthConfig::default()
    };
    if a.top_k == 0 || a.top_k > a.experts || a.tokens == 0 || a.sequences == 0 {
        bail!("need 1 <= --top-k <= --experts and at least one sequence and token");
    }
    let trace = synthetic_trace(&cfg);
    save_trace(&trace, &a.output, None)?;
    println!(
        "wrote {} synthetic tokens to {}",
        trace.n_tokens(),
        a.output.display()
    );
    Ok(())
}

fn collect(a: CollectArgs) -> Result<()> {
    let prompts = match (&a.prompts, &a.token_ids) {
        (Some(p), _) => collector::read_prompts(p)?,
        (None, Some(ids)) => vec![collector::parse_token_ids(ids).map_err(anyhow::Error::msg)?],
        (None, None) => bail!("pass --prompts FILE or --token-ids IDS"),
    };
    if datasets::TraceFormat::from_extension(&a.output).is_none() {
        bail!(
            "{}: use the extension .mctrace, .parquet or .jsonl",
            a.output.display()
        );
    }
    let backend = a.device.parse().map_err(anyhow::Error::msg)?;
    let sampling = if a.temperature > 0.0 {
        inference::generate::Sampling::Temperature {
            temperature: a.temperature,
            seed: a.seed,
        }
    } else {
        inference::generate::Sampling::Greedy
    };
    let cfg = collector::CollectConfig {
        model_dir: a.model,
        prompts,
        max_new_tokens: a.max_new_tokens,
        sampling,
        backend,
        add_special_tokens: a.add_special_tokens,
        output: a.output,
    };
    eprintln!(
        "collecting {} prompts; finished sequences stream to {} until done",
        cfg.prompts.len(),
        collector::journal_path(&cfg.output).display()
    );
    let s = collector::collect(&cfg)?;
    println!(
        "collected {} sequences ({} prefill + {} decode tokens) in {:.2}s, {:.1} tokens/s -> {}",
        s.sequences,
        s.prefill_tokens,
        s.decode_tokens,
        s.seconds,
        s.tokens_per_second(),
        cfg.output.display()
    );
    Ok(())
}

#[derive(Subcommand)]
enum TinymoeCommand {
    /// Train a small Qwen3-MoE on text / .jsonl files; resumes from OUT/train-state/.
    Train(Box<TinymoeTrainArgs>),
}

#[derive(Args)]
struct TinymoeTrainArgs {
    /// Corpus files: text (one document per paragraph) or .jsonl (text/prompt/question/... fields).
    #[arg(long, required = true, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// Output folder: the Hugging Face checkpoint, training.json and train-state/.
    #[arg(short, long)]
    output: PathBuf,
    /// Total optimizer steps.
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    /// Seed of initialisation, validation split and batches (same seed, same run).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after this many steps in this invocation (checkpointed; rerun to resume).
    #[arg(long)]
    run_steps: Option<usize>,
    /// Tokenizer vocabulary (byte-level BPE) and embedding rows.
    #[arg(long, default_value_t = 4096)]
    vocab: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 6)]
    layers: usize,
    /// Residual width.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Key/value heads (grouped-query attention).
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// Head width (default: hidden / heads).
    #[arg(long)]
    head_dim: Option<usize>,
    /// Experts per layer.
    #[arg(long, default_value_t = 16)]
    experts: usize,
    /// Experts chosen per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Hidden width of one expert.
    #[arg(long, default_value_t = 128)]
    expert_width: usize,
    /// Context length (training window and max_position_embeddings).
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// RoPE base.
    #[arg(long, default_value_t = 10000.0)]
    rope_theta: f64,
    /// Tie the output projection to the embedding (no lm_head.weight).
    #[arg(long)]
    tie_embeddings: bool,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Final learning rate as a share of the peak (cosine decay).
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// AdamW weight decay (norm weights excluded).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Global gradient-norm limit; 0 disables clipping.
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Weight of the load-balancing loss.
    #[arg(long, default_value_t = 0.01)]
    aux_loss_coef: f64,
    /// Share of the documents held out for validation.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Validate every this many steps.
    #[arg(long, default_value_t = 100)]
    val_every: usize,
    /// Validation tokens per evaluation (at most).
    #[arg(long, default_value_t = 16384)]
    val_tokens: usize,
    /// Checkpoint every this many steps (Ctrl-C loses at most this many).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn tinymoe_train(a: TinymoeTrainArgs) -> Result<()> {
    use inference::tinymoe::{TinyMoeConfig, TrainOptions};
    let model = TinyMoeConfig {
        vocab_size: a.vocab,
        hidden_size: a.hidden,
        num_layers: a.layers,
        num_heads: a.heads,
        num_kv_heads: a.kv_heads,
        head_dim: a.head_dim.unwrap_or(a.hidden / a.heads.max(1)),
        num_experts: a.experts,
        top_k: a.top_k,
        moe_intermediate_size: a.expert_width,
        context: a.context,
        rope_theta: a.rope_theta,
        tie_embeddings: a.tie_embeddings,
        ..TinyMoeConfig::default()
    };
    let opts = TrainOptions {
        model,
        steps: a.steps,
        seed: a.seed,
        batch_size: a.batch_size,
        lr: a.lr,
        min_lr_ratio: a.min_lr_ratio,
        warmup_steps: a.warmup,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        aux_loss_coef: a.aux_loss_coef,
        val_fraction: a.val_fraction,
        val_every: a.val_every,
        val_tokens: a.val_tokens,
        checkpoint_every: a.checkpoint_every,
        run_steps: a.run_steps,
        progress: !a.quiet,
        ..TrainOptions::new(a.corpus, a.output.clone())
    };
    eprintln!(
        "tiny MoE: {} parameters ({:.1} MB as bf16), {} steps of {} x {} tokens",
        opts.model.n_params(),
        opts.model.bf16_bytes() as f64 / 1e6,
        opts.steps,
        opts.batch_size,
        opts.model.context
    );
    let s = inference::tinymoe::train(&opts)?;
    println!(
        "trained steps {}..{} in {:.1}s ({:.3} s/step)",
        s.start_step,
        s.end_step,
        s.session_seconds,
        s.seconds_per_step()
    );
    match s.report {
        Some(r) => println!(
            "val loss {:.4} (ppl {:.1}; unigram baseline {:.1}), train loss {:.4} -> {}",
            r.final_val_loss,
            r.final_val_perplexity,
            r.unigram_val_perplexity,
            r.final_train_loss,
            a.output.display()
        ),
        None => println!(
            "stopped at step {} of {}; rerun the same command to resume from {}",
            s.end_step,
            opts.steps,
            a.output.join("train-state").display()
        ),
    }
    Ok(())
}
