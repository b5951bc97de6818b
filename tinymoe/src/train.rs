//! The training loop: AdamW (no weight decay on norm weights) with linear warmup and
//! cosine decay, cross-entropy plus a load-balancing loss, global gradient-norm
//! clipping, periodic validation, an `indicatif` progress bar, and checkpoints every N
//! steps so that an interrupted run resumes where its last checkpoint left it.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use predictor::optim::{clip_global_norm, WarmupCosine};

use super::data::{self, Batch, TokenData};
use super::export::{self, TrainingReport};
use super::model::TinyMoe;
use super::state::{self, TrainState, ValPoint};
use super::TinyMoeConfig;
use crate::error::{Result, TinyMoeError};

/// Everything `moecast tinymoe train` can set.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Text (`.txt`, paragraphs) and `.jsonl` files.
    pub corpus: Vec<PathBuf>,
    /// Output folder: the Hugging Face checkpoint, `training.json`, `train-state/`.
    pub out: PathBuf,
    /// The model shape (`context` is also the training window).
    pub model: TinyMoeConfig,
    /// Total optimizer steps.
    pub steps: usize,
    /// Seed of initialisation, split and batches.
    pub seed: u64,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a share of the peak.
    pub min_lr_ratio: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// AdamW weight decay (not applied to norm weights).
    pub weight_decay: f64,
    /// Global gradient-norm limit; 0 disables clipping.
    pub grad_clip: f64,
    /// Weight of the load-balancing loss.
    pub aux_loss_coef: f64,
    /// Held-out share of the documents.
    pub val_fraction: f64,
    /// Validate every this many steps (and at the end).
    pub val_every: usize,
    /// Validation tokens per evaluation (at most).
    pub val_tokens: usize,
    /// Checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Stop after this many steps in this invocation (checkpointed; rerun to resume).
    pub run_steps: Option<usize>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl TrainOptions {
    /// Defaults for everything but the corpus and the output folder.
    pub fn new(corpus: Vec<PathBuf>, out: PathBuf) -> TrainOptions {
        TrainOptions {
            corpus,
            out,
            model: TinyMoeConfig::default(),
            steps: 3000,
            seed: 0,
            batch_size: 16,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 100,
            weight_decay: 0.1,
            grad_clip: 1.0,
            aux_loss_coef: 0.01,
            val_fraction: 0.05,
            val_every: 100,
            val_tokens: 16_384,
            checkpoint_every: 100,
            run_steps: None,
            progress: true,
        }
    }

    /// Learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        WarmupCosine {
            lr: self.lr,
            min_lr_ratio: self.min_lr_ratio,
            warmup: self.warmup_steps as u64,
            total: self.steps as u64,
        }
        .lr_at(step as u64)
    }

    fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let bad = |m: &str| Err(TinyMoeError::input(m.into()));
        if self.steps == 0 || self.batch_size == 0 {
            return bad("steps and batch size must be positive");
        }
        if self.checkpoint_every == 0 || self.val_every == 0 {
            return bad("checkpoint and validation intervals must be positive");
        }
        if !(self.lr > 0.0 && (0.0..=1.0).contains(&self.min_lr_ratio)) {
            return bad("need lr > 0 and 0 <= min-lr-ratio <= 1");
        }
        if self.run_steps == Some(0) {
            return bad("--run-steps must be positive");
        }
        Ok(())
    }
}

/// What a call to [`train`] did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Step the session started from (0, or the checkpoint it resumed).
    pub start_step: usize,
    /// Steps done when it returned.
    pub end_step: usize,
    /// Whether all steps are done and the checkpoint was exported.
    pub finished: bool,
    /// Wall time of this session's steps, seconds.
    pub session_seconds: f64,
    /// Training cross-entropy of each step of this session.
    pub losses: Vec<f64>,
    /// The final report (when finished).
    pub report: Option<TrainingReport>,
}

impl TrainSummary {
    /// Seconds per step in this session.
    pub fn seconds_per_step(&self) -> f64 {
        self.session_seconds / (self.end_step - self.start_step).max(1) as f64
    }
}

/// Result of one evaluation.
pub struct Eval {
    /// Mean cross-entropy per target token.
    pub loss: f64,
    /// Per layer, each expert's share of the routed slots.
    pub usage: Vec<Vec<f64>>,
}

/// Cross-entropy and expert usage of `model` on `batches` (no gradients).
pub fn evaluate(model: &TinyMoe, batches: &[Batch]) -> Eval {
    let c = &model.config;
    let model = model.valid();
    let mut counts = vec![vec![0u64; c.num_experts]; c.num_layers];
    let (mut nll, mut n) = (0.0, 0usize);
    for b in batches {
        let out = model.forward(&b.inputs, b.batch, b.inputs.len() / b.batch);
        let loss = TinyMoe::cross_entropy(out.logits, &b.targets).into_scalar::<f32>() as f64;
        nll += loss * b.targets.len() as f64;
        n += b.targets.len();
        for (l, ids) in out.routing.iter().enumerate() {
            for &id in ids {
                counts[l][id as usize] += 1;
            }
        }
    }
    let usage = counts
        .iter()
        .map(|row| {
            let total = row.iter().sum::<u64>().max(1) as f64;
            row.iter().map(|&x| x as f64 / total).collect()
        })
        .collect();
    Eval {
        loss: nll / n.max(1) as f64,
        usage,
    }
}

fn optimizer(opts: &TrainOptions, model: &TinyMoe) -> ModuleOptimizer {
    let base = || {
        AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.95)
            .with_epsilon(1e-8)
    };
    base()
        .with_weight_decay(opts.weight_decay as f32)
        .init()
        .with_group(
            burn::module::ParamGroup::from_ids(model.norm_param_ids()),
            base().with_weight_decay(0.0).build(),
            None,
        )
}

/// Trains (or resumes) the model described by `opts`, checkpointing into
/// `OUT/train-state/`; when all steps are done, writes the Hugging Face checkpoint and
/// `training.json` into `OUT`.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    opts.validate()?;
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|e| TinyMoeError::io(out, e))?;
    let resumed = state::load_state(out)?;
    if let Some(s) = &resumed {
        check_same_run(s, opts)?;
    }
    let split = data::load_split(&opts.corpus, opts.val_fraction, opts.seed)?;
    let tok_path = state::state_dir(out).join("tokenizer.json");
    let tokenizer = if resumed.is_some() {
        // The checkpoint's tokenizer, not a retrained one: the model was trained on its ids.
        tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| TinyMoeError::file(&tok_path, format!("cannot load tokenizer: {e}")))?
    } else {
        data::train_tokenizer(&split.train, opts.model.vocab_size)?
    };
    let tokenizer_json = tokenizer
        .to_string(true)
        .map_err(|e| TinyMoeError::input(format!("tokenizer serialisation: {e}")))?;
    let eos = data::eos_id(&tokenizer)?;
    if tokenizer.get_vocab_size(true) > opts.model.vocab_size {
        return Err(TinyMoeError::file(
            &tok_path,
            format!(
                "has {} tokens, more than the model's vocab size {}",
                tokenizer.get_vocab_size(true),
                opts.model.vocab_size
            ),
        ));
    }
    let seq = opts.model.context;
    let data = TokenData::new(
        data::encode_stream(&tokenizer, &split.train, eos)?,
        data::encode_stream(&tokenizer, &split.valid, eos)?,
        seq,
        opts.seed,
    )?;
    let val_batches = data.valid_batches(opts.batch_size, opts.val_tokens);

    let device = Device::flex().autodiff();
    let (mut model, mut optim, mut st) = match resumed {
        Some(s) => {
            // The model first: its parameter ids key the optimizer state and the
            // no-decay group.
            let model =
                state::load_model_record(out, &s, TinyMoe::init(&s.model, s.seed, &device))?;
            let optim = state::load_optim_record(out, &s, optimizer(opts, &model))?;
            (model, optim, s)
        }
        None => {
            let model = TinyMoe::init(&opts.model, opts.seed, &device);
            let optim = optimizer(opts, &model);
            (model, optim, fresh_state(opts))
        }
    };
    let start_step = st.step;
    let stop = opts
        .run_steps
        .map_or(opts.steps, |r| (start_step + r).min(opts.steps));
    let bar = if opts.progress {
        let b = ProgressBar::new(opts.steps as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
            )
            .expect("valid progress template")
            .progress_chars("=> "),
        );
        b.set_position(start_step as u64);
        b
    } else {
        ProgressBar::hidden()
    };
    let say = |line: String| {
        if opts.progress {
            bar.println(line);
        } else {
            eprintln!("{line}");
        }
    };
    if start_step > 0 {
        say(format!("resuming from step {start_step}"));
    }
    let session = Instant::now();
    let mut losses = Vec::new();
    let mut since_val: Vec<f64> = Vec::new();
    let mut last_eval: Option<(usize, Eval)> = None;
    while st.step < stop {
        let t0 = Instant::now();
        let b = data.train_batch(st.step, opts.batch_size);
        let fwd = model.forward(&b.inputs, b.batch, seq);
        let ce = TinyMoe::cross_entropy(fwd.logits, &b.targets);
        let aux = fwd.aux_loss;
        let loss = ce.clone() + aux.clone() * opts.aux_loss_coef;
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let gnorm = clip_global_norm(&model, &mut grads, opts.grad_clip);
        let lr = opts.lr_at(st.step);
        model = optim.step(lr, model, grads);
        let ce = ce.into_scalar::<f32>() as f64;
        let aux = aux.into_scalar::<f32>() as f64;
        if !ce.is_finite() {
            return Err(TinyMoeError::input(format!(
                "training diverged at step {} (loss {ce}); lower --lr",
                st.step
            )));
        }
        let dt = t0.elapsed().as_secs_f64();
        st.step += 1;
        st.elapsed_s += dt;
        st.tokens_seen += b.targets.len() as u64;
        st.recent_losses.push(ce);
        if st.recent_losses.len() > 50 {
            st.recent_losses.remove(0);
        }
        losses.push(ce);
        since_val.push(ce);
        bar.set_position(st.step as u64);
        bar.set_message(format!(
            "loss {ce:.3} aux {aux:.3} |g| {gnorm:.2} lr {lr:.1e} {:.0} tok/s",
            b.targets.len() as f64 / dt
        ));
        if st.step.is_multiple_of(opts.val_every) || st.step == opts.steps {
            let e = evaluate(&model, &val_batches);
            let train_loss = since_val.iter().sum::<f64>() / since_val.len().max(1) as f64;
            since_val.clear();
            let line = format!(
                "step {:>6}  train {train_loss:.4}  val {:.4}  (ppl {:.1})  {:.3} s/step",
                st.step,
                e.loss,
                e.loss.exp(),
                st.elapsed_s / st.step as f64
            );
            say(line);
            st.history.push(ValPoint {
                step: st.step,
                train_loss,
                val_loss: e.loss,
            });
            last_eval = Some((st.step, e));
        }
        if st.step.is_multiple_of(opts.checkpoint_every) || st.step == stop {
            state::save(out, &model, &optim, &st, &tokenizer_json)?;
        }
    }
    bar.finish_and_clear();
    let session_seconds = session.elapsed().as_secs_f64();
    let finished = st.step >= opts.steps;
    let report = if finished {
        let e = match last_eval.take() {
            Some((step, e)) if step == st.step => e,
            _ => evaluate(&model, &val_batches),
        };
        let unigram = data.unigram_perplexity(opts.model.vocab_size, &val_batches);
        let report = TrainingReport::new(opts, &st, &e, unigram, &data, &val_batches);
        export::write_checkpoint(out, &model, &tokenizer_json, eos, &report)?;
        Some(report)
    } else {
        None
    };
    Ok(TrainSummary {
        start_step,
        end_step: st.step,
        finished,
        session_seconds,
        losses,
        report,
    })
}

fn fresh_state(opts: &TrainOptions) -> TrainState {
    TrainState {
        step: 0,
        model: opts.model.clone(),
        seed: opts.seed,
        corpus: opts.corpus.clone(),
        val_fraction: opts.val_fraction,
        batch_size: opts.batch_size,
        elapsed_s: 0.0,
        tokens_seen: 0,
        history: Vec::new(),
        recent_losses: Vec::new(),
    }
}

/// A checkpoint in `OUT` must come from the same run: shape, seed, corpus and split.
fn check_same_run(s: &TrainState, opts: &TrainOptions) -> Result<()> {
    let mut diffs = Vec::new();
    if s.model != opts.model {
        diffs.push(format!("model shape {:?} vs {:?}", s.model, opts.model));
    }
    if s.seed != opts.seed {
        diffs.push(format!("seed {} vs {}", s.seed, opts.seed));
    }
    if s.corpus != opts.corpus {
        diffs.push("corpus files".to_string());
    }
    if s.val_fraction != opts.val_fraction {
        diffs.push(format!(
            "validation fraction {} vs {}",
            s.val_fraction, opts.val_fraction
        ));
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(TinyMoeError::file(
        &state::state_dir(&opts.out),
        format!(
            "holds a checkpoint of a different run ({}); use another -o or remove the folder",
            diffs.join("; ")
        ),
    ))
}
