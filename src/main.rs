//! The `moecast` command line: parses arguments and calls the library crates.

mod inputs;
mod model_cmd;
mod predict_cmd;
mod run_cmd;
mod sim_cmd;
mod trace_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// mimalloc, keeping freed memory for reuse (see [`backend::allocator`]): Burn's large
/// intermediate tensors otherwise go back to the OS and are page-faulted in again every
/// training step.
#[global_allocator]
static GLOBAL: backend::allocator::Allocator = backend::allocator::Allocator;

use model_cmd::{CheckpointCommand, CollectArgs, TinymoeCommand};
use predict_cmd::{EvalArgs, TrainArgs};
use trace_cmd::TraceCommand;

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
    /// Train an expert predictor on routing traces (writes checkpoints/NAME).
    Train(Box<TrainArgs>),
    /// Evaluate a predictor and the baselines on traces: precision, recall, F1.
    Eval(EvalArgs),
    /// Build a predictor for a model shape (no trace needed) and print its parameter
    /// count and memory, e.g. for Qwen3-30B-A3B: --moe-layers 48 --experts 128 --top-k 8
    /// --vocab 151936.
    PredictorSize(predict_cmd::SizeArgs),
    /// Replay a trace through an expert cache with prefetching: hit rate, stall, tokens/s.
    Simulate(Box<sim_cmd::SimulateArgs>),
    /// Generate with experts offloaded to disk: bounded expert cache, learned prefetch,
    /// cache-aware routing; reports tokens/s, hit rate and stall time.
    Run(Box<run_cmd::RunArgs>),
    /// Compare runs of `moecast run --json`: mean decode tokens/s per cache size and
    /// mode, the ratio to demand paging and the gap to the oracle closed; --plot charts.
    CompareRuns(run_cmd::CompareArgs),
    /// Train a tiny MoE language model and write it as a Hugging Face checkpoint.
    #[command(subcommand)]
    Tinymoe(TinymoeCommand),
    /// Make checkpoints: `synth` writes one with random weights at a production shape.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
}

fn main() {
    backend::allocator::retain_freed_memory();
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
        Command::Trace(cmd) => trace_cmd::run(cmd),
        Command::Collect(a) => model_cmd::collect(a),
        Command::Tinymoe(TinymoeCommand::Train(a)) => model_cmd::tinymoe_train(*a),
        Command::Train(a) => predict_cmd::train(*a),
        Command::Eval(a) => predict_cmd::eval(a),
        Command::PredictorSize(a) => predict_cmd::size(a),
        Command::Simulate(a) => sim_cmd::simulate_cmd(*a),
        Command::Run(a) => run_cmd::run(*a),
        Command::CompareRuns(a) => run_cmd::compare(a),
        Command::Checkpoint(CheckpointCommand::Synth(a)) => model_cmd::checkpoint_synth(a),
    }
}
