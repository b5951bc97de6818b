//! `moecast collect` and `moecast tinymoe train`: running and training MoE models.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompts", "token_ids"])))]
pub(crate) struct CollectArgs {
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
    /// Sequences sampled per prompt (each with its own seed; names get `#sJ`).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed of the sampler (sequence i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Add the tokenizer's special tokens (BOS) to text prompts.
    #[arg(long)]
    add_special_tokens: bool,
    /// Also record each MoE layer's router input (the normalised hidden state its gate
    /// reads; f16 in .mctrace, float lists in .parquet/.jsonl).
    #[arg(long)]
    hidden_states: bool,
    /// Also record each MoE layer's router logits over all experts (f32).
    #[arg(long)]
    router_logits: bool,
    /// Also record each MoE layer's gate applied to the hidden state before the layer's
    /// attention (the pre-attention predictor's signal; f32 over all experts).
    #[arg(long)]
    pre_attention_logits: bool,
    /// Compute backend: flex (default), ndarray (`--features ndarray` builds), wgpu, cuda / cuda:N (`--features wgpu` / `cuda` builds).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Output trace: .mctrace, .parquet or .jsonl.
    #[arg(short, long)]
    output: PathBuf,
}

pub(crate) fn collect(a: CollectArgs) -> Result<()> {
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
    let sampling = inference::generate::Sampling::from_temperature(a.temperature, a.seed);
    let cfg = collector::CollectConfig {
        model_dir: a.model,
        prompts,
        max_new_tokens: a.max_new_tokens,
        sampling,
        samples: a.samples,
        backend,
        add_special_tokens: a.add_special_tokens,
        channels: [
            (a.hidden_states, "router_inputs"),
            (a.router_logits, "router_logits"),
            (a.pre_attention_logits, "pre_attention_logits"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| name.to_string())
        .collect(),
        output: a.output,
    };
    eprintln!(
        "collecting {} prompts x {} samples; finished sequences stream to {} until done \
         (after an interruption, the same command resumes it)",
        cfg.prompts.len(),
        cfg.samples.max(1),
        collector::journal_path(&cfg.output).display()
    );
    let s = collector::collect(&cfg)?;
    let kept = if s.resumed_sequences > 0 {
        format!(
            "; {} of the sequences ({} tokens) kept from the interrupted run's journal",
            s.resumed_sequences, s.resumed_tokens
        )
    } else {
        String::new()
    };
    println!(
        "collected {} sequences ({} prefill + {} decode tokens) in {:.2}s, {:.1} tokens/s -> {}{kept}",
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
pub(crate) enum CheckpointCommand {
    /// Write a Qwen3-MoE checkpoint with seeded random weights at a published model's
    /// shape (its layers, experts or top-k may be changed), e.g. to replay a trace with
    /// real expert sizes: `moecast checkpoint synth --layers 6 --experts 16 --top-k 2
    /// --vocab 4096 -o DIR` has Qwen3-30B-A3B's 2048 x 768 experts (9.4 MB each).
    Synth(SynthArgs),
}

#[derive(Args)]
pub(crate) struct SynthArgs {
    /// The published shape to start from.
    #[arg(long, default_value = "qwen3-30b-a3b")]
    like: String,
    /// Decoder layers (all MoE).
    #[arg(long)]
    layers: Option<usize>,
    /// Routed experts per layer.
    #[arg(long)]
    experts: Option<usize>,
    /// Experts chosen per token.
    #[arg(long)]
    top_k: Option<usize>,
    /// Vocabulary (embedding rows).
    #[arg(long)]
    vocab: Option<usize>,
    /// Residual width (the experts' input and output).
    #[arg(long)]
    hidden: Option<usize>,
    /// Hidden width of one expert.
    #[arg(long)]
    moe_intermediate: Option<usize>,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder.
    #[arg(short, long)]
    output: PathBuf,
}

pub(crate) fn checkpoint_synth(a: SynthArgs) -> Result<()> {
    let mut c = tinymoe::synth::preset(&a.like)
        .ok_or_else(|| anyhow::anyhow!("unknown shape '{}' (qwen3-30b-a3b)", a.like))?;
    c.num_layers = a.layers.unwrap_or(c.num_layers);
    c.num_experts = a.experts.unwrap_or(c.num_experts);
    c.top_k = a.top_k.unwrap_or(c.top_k);
    c.vocab_size = a.vocab.unwrap_or(c.vocab_size);
    c.hidden_size = a.hidden.unwrap_or(c.hidden_size);
    c.moe_intermediate_size = a.moe_intermediate.unwrap_or(c.moe_intermediate_size);
    let sizes = [
        c.num_layers,
        c.num_experts,
        c.top_k,
        c.vocab_size,
        c.hidden_size,
        c.moe_intermediate_size,
    ];
    if sizes.contains(&0) {
        bail!("--layers, --experts, --top-k, --vocab, --hidden and --moe-intermediate must be positive");
    }
    let expert = tinymoe::synth::expert_bytes(&c);
    eprintln!(
        "writing {} layers x {} experts (top-{}) of {} x {} ({:.1} MB each, {:.2} GB of experts) to {}",
        c.num_layers,
        c.num_experts,
        c.top_k,
        c.hidden_size,
        c.moe_intermediate_size,
        expert as f64 / 1e6,
        (expert * (c.num_layers * c.num_experts) as u64) as f64 / 1e9,
        a.output.display()
    );
    let bytes = tinymoe::synth::write_synthetic_checkpoint(&a.output, &c, a.seed)?;
    println!(
        "{}: {:.2} GB, experts of {expert} bytes",
        a.output.display(),
        bytes as f64 / 1e9
    );
    Ok(())
}

#[derive(Subcommand)]
pub(crate) enum TinymoeCommand {
    /// Train a small Qwen3-MoE on text / .jsonl files; resumes from OUT/train-state/.
    Train(Box<TinymoeTrainArgs>),
}

#[derive(Args)]
pub(crate) struct TinymoeTrainArgs {
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

pub(crate) fn tinymoe_train(a: TinymoeTrainArgs) -> Result<()> {
    use tinymoe::{TinyMoeConfig, TrainOptions};
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
    let s = tinymoe::train(&opts)?;
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
