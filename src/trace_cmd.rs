//! `moecast trace ...`: import, convert, export, inspect, statistics, synthesis.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use datasets::import::{ImportFormat, ImportOptions};
use datasets::stats;
use datasets::synth::{synthetic_trace, SynthConfig};
use datasets::{open_trace, save_trace, DatasetWriter, TraceDataset, TraceFormat};

#[derive(Subcommand)]
pub(crate) enum TraceCommand {
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
pub(crate) enum FromFormat {
    RouteCsv,
    Warp,
    RouterTraceV2,
    Jsonl,
    HookJsonl,
    Vllm,
    Sglang,
    /// SGLang expert-distribution recorder dumps (`per_token` `.pt`, one per rank).
    SglangDump,
    Megatron,
}

impl From<FromFormat> for ImportFormat {
    fn from(f: FromFormat) -> Self {
        match f {
            FromFormat::RouteCsv => ImportFormat::RouteCsv,
            FromFormat::Warp => ImportFormat::Warp,
            FromFormat::RouterTraceV2 => ImportFormat::RouterTraceV2,
            FromFormat::Jsonl => ImportFormat::Jsonl,
            FromFormat::HookJsonl => ImportFormat::HookJsonl,
            FromFormat::Vllm => ImportFormat::Vllm,
            FromFormat::Sglang => ImportFormat::Sglang,
            FromFormat::SglangDump => ImportFormat::SglangDump,
            FromFormat::Megatron => ImportFormat::Megatron,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum StoreFormat {
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
pub(crate) struct ImportArgs {
    /// Input files or directories (a Megatron --moe-routing-trace-path directory, or a
    /// directory of saved responses); several become one trace (same model shape).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Input format (default: detected from the content).
    #[arg(long, value_enum)]
    from: Option<FromFormat>,
    /// Output trace: .mctrace, .parquet or .jsonl; or a folder (ending in '/', or
    /// existing) to add the import to as a hive-partitioned Parquet dataset
    /// (DIR/model=M/source=S/part-N.parquet), one input file in memory at a time.
    #[arg(short, long)]
    output: PathBuf,
    /// Dataset output: at most this many (token, MoE layer) rows per Parquet part
    /// (whole sequences; a longer sequence gets a part of its own).
    #[arg(long, default_value_t = datasets::dataset::DEFAULT_PART_ROWS)]
    part_rows: usize,
    /// Model name to record instead of the one found in the input.
    #[arg(long)]
    model: Option<String>,
    /// Experts per layer, for formats that do not record it.
    #[arg(long)]
    n_experts: Option<u32>,
    /// Experts per token, for formats that do not record it (SGLang).
    #[arg(long)]
    top_k: Option<u32>,
    /// Megatron: number of the first layer (0: hook path, default; 1: inference path).
    #[arg(long)]
    layer_base: Option<u32>,
    /// vLLM / SGLang: model layer numbers of the MoE layers (e.g. 3-60 or 1,3,5-7), for
    /// arrays whose layer axis holds only the MoE layers (default: numbered 0..).
    #[arg(long, value_parser = datasets::import::parse_layer_list)]
    moe_layers: Option<std::vec::Vec<u32>>,
}

#[derive(Args)]
pub(crate) struct ConvertArgs {
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
pub(crate) struct ExportArgs {
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
pub(crate) struct InfoArgs {
    /// Trace (.mctrace, .parquet or .jsonl) or dataset folder.
    input: PathBuf,
}

#[derive(Args)]
pub(crate) struct StatsArgs {
    /// Trace (.mctrace, .parquet or .jsonl), or a dataset folder (streamed one
    /// memory-mapped part at a time).
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
pub(crate) struct SynthArgs {
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

/// Runs one `trace` subcommand.
pub(crate) fn run(cmd: TraceCommand) -> Result<()> {
    match cmd {
        TraceCommand::Import(a) => import(a),
        TraceCommand::Convert(a) => convert(a),
        TraceCommand::Export(a) => export(a),
        TraceCommand::Info(a) => info(a),
        TraceCommand::Stats(a) => trace_stats(a),
        TraceCommand::Synth(a) => synth(a),
    }
}

fn import(a: ImportArgs) -> Result<()> {
    let opts = ImportOptions {
        model: a.model,
        n_experts: a.n_experts,
        top_k: a.top_k,
        layer_base: a.layer_base,
        moe_layers: a.moe_layers,
    };
    let start = Instant::now();
    let format = a.from.map(Into::into);
    if a.output.as_os_str().to_string_lossy().ends_with('/') || a.output.is_dir() {
        return import_dataset(&a.inputs, format, &opts, &a.output, a.part_rows, start);
    }
    let imported = datasets::import::import(&a.inputs, format, &opts)?;
    print_notes(&imported.notes);
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

fn import_dataset(
    inputs: &[PathBuf],
    format: Option<ImportFormat>,
    opts: &ImportOptions,
    root: &Path,
    part_rows: usize,
    start: Instant,
) -> Result<()> {
    let mut writer = DatasetWriter::create(root, part_rows)?;
    let bar = crate::inputs::bar(0, "files");
    let mut files = 0;
    let notes =
        datasets::import::import_to_dataset(inputs, format, opts, &mut writer, |done, total| {
            files = total;
            bar.set_length(total as u64);
            bar.set_position(done as u64)
        })?;
    bar.finish_and_clear();
    print_notes(&notes);
    let (tokens, sequences) = (writer.tokens, writer.sequences);
    let partitions: Vec<String> = writer
        .partitions()
        .iter()
        .map(|p| root.join(p).display().to_string())
        .collect();
    let parts = writer.finish()?;
    println!(
        "imported {tokens} tokens in {sequences} sequences from {files} files -> {} part(s) in {} in {:.3}s",
        parts.len(),
        partitions.join(", "),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints importer notes; notes repeated for many files are printed once with a count.
fn print_notes(notes: &[String]) {
    let mut seen: Vec<(String, &String, usize)> = Vec::new();
    for note in notes {
        let tail = note
            .split_once(": ")
            .map_or(note.as_str(), |(_, t)| t)
            .to_string();
        match seen.iter_mut().find(|(t, _, _)| *t == tail) {
            Some((_, _, n)) => *n += 1,
            None => seen.push((tail, note, 1)),
        }
    }
    for (_, first, n) in seen {
        match n {
            1 => eprintln!("note: {first}"),
            _ => eprintln!("note: {first} (and {} more files)", n - 1),
        }
    }
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
    if a.input.is_dir() {
        let ds = TraceDataset::open(&a.input)?;
        println!("{}", serde_json::to_string_pretty(ds.meta())?);
        println!(
            "dataset: {} parts, {} rows (token x MoE layer)",
            ds.parts().len(),
            ds.rows().iter().sum::<usize>()
        );
        for (p, n) in ds.parts().iter().zip(ds.rows()) {
            let rel = p.strip_prefix(ds.root()).unwrap_or(p);
            println!("  {:<60} {n:>10} rows", rel.display());
        }
        return Ok(());
    }
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
            let elem = match s.dtype.as_str() {
                "u8" => 1,
                "u16" | "f16" => 2,
                _ => 4,
            };
            println!(
                "  {:<20} {:>4} x {:>10} at {:>10}  ({:.2} MB)",
                s.name,
                s.dtype,
                s.len,
                s.offset,
                (s.len * elem) as f64 / 1e6
            );
        }
    }
    Ok(())
}

fn trace_stats(a: StatsArgs) -> Result<()> {
    let meta = crate::inputs::trace_meta(&a.input)?;
    let caps = if a.lru_capacity.is_empty() {
        stats::default_lru_capacities(meta.n_experts, meta.top_k)
    } else {
        a.lru_capacity.clone()
    };
    if let Some(&c) = caps.iter().find(|&&c| c == 0 || c > meta.n_experts) {
        bail!("--lru-capacity {c} must be in 1..={}", meta.n_experts);
    }
    let s = if a.input.is_dir() {
        let ds = TraceDataset::open(&a.input)?;
        let bar = crate::inputs::bar(ds.parts().len(), "part passes");
        let s = ds.stats(&caps, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        s
    } else {
        stats::compute(&open_trace(&a.input)?.view(), &caps)
    };
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
