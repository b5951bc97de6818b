//! `moecast train` and `moecast eval`: the expert predictor.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use datasets::examples::{Split, SplitConfig};
use predictor::{
    eval, EvalOptions, LoadedPredictor, PredictorConfig, Task, TrainOptions, TrainSettings,
};

#[derive(Args)]
pub(crate) struct TrainArgs {
    /// Training traces (any storage form; .mctrace is memory-mapped). Sequences are split
    /// into train / validation / test by sequence.
    #[arg(long, num_args = 1.., required = true)]
    trace: Vec<PathBuf>,
    /// next-token: all layers of the next token; lookahead: the next --horizon layers of
    /// the current token given its earlier layers.
    #[arg(long, default_value = "next-token")]
    task: Task,
    /// Output directory (e.g. checkpoints/NAME); rerunning resumes its checkpoint.
    #[arg(short, long)]
    output: PathBuf,
    /// Layers predicted ahead (lookahead).
    #[arg(long, default_value_t = 3)]
    horizon: usize,
    /// What lookahead queries read of the current token's routed layers: ids, hidden
    /// (the last routed layer's router input; traces from `collect --hidden-states`) or
    /// ids+hidden. `--task next-token` reads none of them: ids only.
    #[arg(long, default_value = "ids")]
    features: predictor::config::Features,
    /// Residual width of the predictor.
    #[arg(long, default_value_t = 128)]
    d_model: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 3)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Tokens of context.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Token-id embedding rows (ids are folded modulo this). Default: the largest token
    /// id of the training traces + 1, so no two ids share a row (the card says how many
    /// seen ids share one when you set fewer).
    #[arg(long)]
    token_buckets: Option<usize>,
    /// Leave out the count prior path (the token table's log-odds added to the logits).
    #[arg(long)]
    no_token_prior: bool,
    /// Hidden width of the router-input map (hidden features).
    #[arg(long, default_value_t = 512)]
    hidden_width: usize,
    /// Dropout probability during training.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Probability of hiding a position's token id in training; above 0 the runtime
    /// also forecasts the next token's first layer before its id is sampled.
    #[arg(long, default_value_t = 0.0)]
    token_dropout: f64,
    /// Windows of --context tokens per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (AdamW, linear warmup, cosine decay).
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 100)]
    warmup_steps: usize,
    /// Most epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Early stopping: epochs without a better validation F1.
    #[arg(long, default_value_t = 4)]
    patience: usize,
    /// BCE weight of the positive class (an expert that is chosen).
    #[arg(long, default_value_t = 1.0)]
    pos_weight: f64,
    /// Lookahead queries (known-layer counts) sampled per step.
    #[arg(long, default_value_t = 8)]
    queries_per_batch: usize,
    /// Share of sequences for validation (early stopping).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Share of sequences held out for `eval --split test` (0 when testing on other traces).
    #[arg(long, default_value_t = 0.1)]
    test_fraction: f64,
    /// Save a resumable checkpoint every this many steps (and after every epoch).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    /// Stop after this many steps (checkpointed; rerun the same command to resume).
    #[arg(long)]
    run_steps: Option<u64>,
    /// Seed of the split, initialisation and batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Data-parallel shards per step: the batch's windows split over this many CPU
    /// threads, gradients summed (0: one per thread, `RAYON_NUM_THREADS`; 1 on a GPU).
    /// Kept by the checkpoint; a run repeats exactly for the same count.
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Backend: flex (CPU, default), ndarray (CPU; `--features ndarray` builds), wgpu (GPU; `--features wgpu` builds), cuda / cuda:N (NVIDIA; `--features cuda` builds).
    #[arg(long, default_value = "flex")]
    device: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub(crate) fn train(a: TrainArgs) -> Result<()> {
    let first = a.trace.first().context("give at least one --trace")?;
    let meta = crate::inputs::trace_meta(first)?;
    crate::inputs::trace_files(&a.trace)?;
    a.task
        .check_features(a.features)
        .map_err(anyhow::Error::msg)?;
    if a.features.hidden() && meta.router_input_dim().is_none() {
        bail!(
            "{}: --features {} reads router inputs and this trace has none (collect it with --hidden-states)",
            first.display(),
            a.features.as_str()
        );
    }
    let config = PredictorConfig::new(datasets::examples::RoutingShape::of(&meta), a.task)
        .with_horizon(a.horizon)
        .with_d_model(a.d_model)
        .with_n_layers(a.layers)
        .with_n_heads(a.heads)
        .with_context(a.context)
        .with_token_buckets(a.token_buckets.unwrap_or(0))
        .with_token_prior(!a.no_token_prior)
        .with_dropout(a.dropout)
        .with_token_dropout(a.token_dropout)
        .with_hidden_width(a.hidden_width)
        .with_features(a.features)
        .with_router_input_dim(meta.router_input_dim().unwrap_or(0) as usize);
    let opts = TrainOptions {
        traces: a.trace,
        config,
        split: SplitConfig {
            validation: a.val_fraction,
            test: a.test_fraction,
            seed: a.seed,
        },
        settings: TrainSettings {
            batch_size: a.batch_size,
            lr: a.lr,
            weight_decay: a.weight_decay,
            warmup_steps: a.warmup_steps,
            max_epochs: a.epochs,
            patience: a.patience,
            pos_weight: a.pos_weight,
            queries_per_batch: a.queries_per_batch,
            checkpoint_every: a.checkpoint_every,
            seed: a.seed,
            shards: a.shards,
            ..TrainSettings::default()
        },
        backend: a.device.parse().map_err(anyhow::Error::msg)?,
        out: a.output,
        progress: !a.quiet,
        run_steps: a.run_steps,
    };
    let s = predictor::train(&opts)?;
    print!("{}", s.describe(&opts.out));
    Ok(())
}

#[derive(Args)]
pub(crate) struct SizeArgs {
    /// MoE layers of the model.
    #[arg(long)]
    moe_layers: usize,
    /// Routed experts per MoE layer.
    #[arg(long)]
    experts: usize,
    /// Experts chosen per token.
    #[arg(long)]
    top_k: usize,
    /// Token ids (the tokenizer's vocabulary): one embedding row each.
    #[arg(long)]
    vocab: usize,
    /// next-token or lookahead.
    #[arg(long, default_value = "lookahead")]
    task: Task,
    /// Residual width, as for `train`.
    #[arg(long, default_value_t = 128)]
    d_model: usize,
    /// Transformer blocks, as for `train`.
    #[arg(long, default_value_t = 3)]
    layers: usize,
}

pub(crate) fn size(a: SizeArgs) -> Result<()> {
    let shape = datasets::examples::RoutingShape {
        n_moe: a.moe_layers,
        n_experts: a.experts,
        top_k: a.top_k,
    };
    let config = PredictorConfig::new(shape, a.task)
        .with_d_model(a.d_model)
        .with_n_layers(a.layers)
        .with_token_buckets(a.vocab);
    let f = predictor::config::Footprint::of(&config).map_err(anyhow::Error::msg)?;
    print!("{}", f.describe(&config, a.vocab));
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SplitArg {
    /// Every sequence of the given traces.
    All,
    /// The test split the predictor recorded for its own training traces.
    Test,
}

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// Predictor directory written by `moecast train`.
    #[arg(long)]
    predictor: PathBuf,
    /// Traces to evaluate on (default with --split test: the training traces).
    #[arg(long, num_args = 1..)]
    trace: Vec<PathBuf>,
    /// Which sequences: all of --trace, or the predictor's own test split.
    #[arg(long, value_enum, default_value = "all")]
    split: SplitArg,
    /// Prefetch budget B for recall@B, experts per layer (default 2 x top-k).
    #[arg(long)]
    budget: Option<usize>,
    /// Write the full report (per layer, every method) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write F1-per-layer charts (PNG) into this directory.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Skip the baselines.
    #[arg(long)]
    no_baselines: bool,
    /// The MoE checkpoint the traces come from: adds its own forecasts as baselines: the
    /// cross-layer gate (its gate of layer l+h applied to layer l's router input; traces
    /// from `collect --hidden-states`), the pre-attention gate, and the logit lens's
    /// forecast of the first layer before the token's id (router inputs too; refined by
    /// the predictor's per-token layer-0 counts).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Backend: flex (CPU, default), ndarray (CPU; `--features ndarray` builds), wgpu (GPU; `--features wgpu` builds), cuda / cuda:N (NVIDIA; `--features cuda` builds).
    #[arg(long, default_value = "flex")]
    device: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub(crate) fn eval(a: EvalArgs) -> Result<()> {
    let backend: predictor::device::BackendKind = a.device.parse().map_err(anyhow::Error::msg)?;
    let device = backend.device();
    let p = LoadedPredictor::load(&a.predictor, &device)?;
    crate::inputs::trace_files(&a.trace)?;
    let (set, mut notes) =
        predictor::card::evaluation_set(&p.card, &a.trace, a.split == SplitArg::All)?;
    let before_id = p.card.config.token_dropout > 0.0;
    let model = match &a.model {
        Some(dir) => Some(offload::gate::model_baselines(
            dir,
            &set,
            before_id,
            p.baselines.as_ref(),
        )?),
        None => None,
    };
    let base = EvalOptions {
        batch_size: a.batch_size,
        budget: a.budget,
        baselines: !a.no_baselines,
        progress: !a.quiet,
        ..Default::default()
    };
    let opts = match model {
        Some(m) => {
            notes.extend(m.notes);
            EvalOptions {
                gate: m.gate,
                early: Some(m.early),
                before_id: m.before_id,
                ..base
            }
        }
        None => base,
    };
    for note in &notes {
        eprintln!("note: {note}");
    }
    let mut report = predictor::evaluate(
        &p.model,
        p.baselines.as_ref(),
        &set,
        Split::Test,
        &device,
        &opts,
    )?;
    if before_id {
        let mut online = predictor::OnlinePredictor::new(p);
        eval::score_before_id(&mut report, &mut online, &set, Split::Test, &opts.before_id)?;
    }
    print!("{}", eval::render_table(&report));
    for (baseline, group, theirs, ours) in report.baseline_wins() {
        eprintln!(
            "note: the {baseline} baseline beats the predictor at {group} (F1 {theirs:.4} against {ours:.4})"
        );
    }
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&report)?;
        predictor::state::write_atomic(path, json.as_bytes())?;
        eprintln!("report -> {}", path.display());
    }
    if let Some(dir) = &a.plot {
        for f in eval::plot_f1(&report, dir)? {
            eprintln!("plot -> {}", f.display());
        }
    }
    Ok(())
}
