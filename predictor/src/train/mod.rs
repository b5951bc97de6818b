//! Training: AdamW with linear warmup and cosine decay, masked BCE, validation F1 after
//! every epoch with early stopping, resumable checkpoints in `OUT/train-state/`
//! (every epoch and every `checkpoint_every` steps), the best model in `OUT/model.bpk`.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, ModuleOptimizer};
use datasets::examples::{ExampleSet, Split, Window};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use crate::baselines::BaselineStats;
use crate::batch::BatchTensors;
use crate::card::{PredictorCard, PredictorDir};
use crate::config::{PredictorConfig, Query};
use crate::error::{PredictorError, Result};
use crate::eval::{evaluate, EvalOptions, EvalReport};
use crate::model::{mix, ExpertPredictor};
use crate::optim::{clip_global_norm, WarmupCosine};
use crate::state::CheckpointDir;
use crate::step::{loss_and_gradients, query_denominators, resolve_shards};

mod settings;
pub use settings::{EpochRecord, TrainOptions, TrainProgress, TrainSettings, TrainSummary};

/// Warm-up steps actually used: the setting, but at most a tenth of the run, so a run of
/// a few dozen steps (a trace of a few thousand tokens) is not all warm-up.
fn warmup_steps(s: &TrainSettings, total: u64) -> u64 {
    (s.warmup_steps as u64).min((total / 10).max(1))
}

/// Optimiser steps early stopping waits without a better validation F1, at least, however
/// short the epochs.
const PATIENCE_MIN_STEPS: u64 = 100;

/// Early stopping waits for `patience` validations without a better F1 that span at
/// least [`PATIENCE_MIN_STEPS`] steps (an epoch of a small trace is a couple of steps),
/// and never stops before the warm-up is over and a fifth of the planned steps are done.
fn should_stop(p: &TrainProgress, s: &TrainSettings, step: u64, total: u64) -> bool {
    let min_steps = warmup_steps(s, total).max(total / 5);
    let per_epoch = total / s.max_epochs.max(1) as u64;
    let waited = p.epochs_since_best as u64 * per_epoch;
    p.epoch >= s.max_epochs
        || (p.epochs_since_best >= s.patience && waited >= PATIENCE_MIN_STEPS && step >= min_steps)
}

fn schedule(s: &TrainSettings, total: u64) -> WarmupCosine {
    WarmupCosine {
        lr: s.lr,
        min_lr_ratio: s.min_lr_ratio,
        warmup: warmup_steps(s, total),
        total,
    }
}

fn optimizer(s: &TrainSettings) -> ModuleOptimizer {
    AdamWConfig::new()
        .with_weight_decay(s.weight_decay as f32)
        .init()
}

/// The shuffled windows of an epoch (the same on resume).
fn epoch_order(windows: &[Window], seed: u64, epoch: usize) -> Vec<Window> {
    let mut w = windows.to_vec();
    w.shuffle(&mut StdRng::seed_from_u64(
        seed ^ (0x9e37_79b9 * (epoch as u64 + 1)),
    ));
    w
}

fn validate_opts(o: &TrainOptions) -> Result<()> {
    o.config.validate().map_err(PredictorError::Invalid)?;
    o.config
        .task
        .check_features(o.config.features)
        .map_err(PredictorError::Invalid)?;
    let s = &o.settings;
    if s.batch_size == 0 || s.max_epochs == 0 || s.queries_per_batch == 0 || s.checkpoint_every == 0
    {
        return Err(PredictorError::Invalid(
            "batch size, epochs, queries per batch and checkpoint interval must be positive".into(),
        ));
    }
    if !(s.lr > 0.0 && s.pos_weight > 0.0) {
        return Err(PredictorError::Invalid(
            "--lr and --pos-weight must be positive".into(),
        ));
    }
    Ok(())
}

/// Trains (or resumes) a predictor on the train split of `opts.traces`.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    let set = ExampleSet::open(&opts.traces, &opts.split)?;
    let mut resolved = opts.clone();
    if resolved.config.token_buckets == 0 {
        resolved.config.token_buckets = auto_token_buckets(&set);
    }
    let auto_shards = resolved.settings.shards == 0;
    if auto_shards {
        let (kind, batch) = (resolved.backend, resolved.settings.batch_size);
        resolved.settings.shards = resolve_shards(0, kind, batch);
    }
    let opts = &resolved;
    validate_opts(opts)?;
    opts.config
        .routing
        .check(set.meta(), &opts.traces[0])
        .map_err(PredictorError::from)?;
    check_router_inputs(&opts.config, &set)?;
    let dir = PredictorDir::new(opts.out.clone());
    std::fs::create_dir_all(&opts.out).map_err(|e| PredictorError::io(&opts.out, e))?;
    let ckpt = CheckpointDir::new(dir.train_state());
    let cfg = &opts.config;
    let st = &opts.settings;
    let train_windows = set.windows(Split::Train, cfg.context);
    if set.split_tokens(Split::Validation) == 0 {
        return Err(PredictorError::Invalid(
            "the validation split is empty".into(),
        ));
    }

    let mut stats = BaselineStats::new(
        cfg.routing,
        cfg.horizon.min(cfg.routing.n_moe.saturating_sub(1)).max(1),
    );
    for s in set.split(Split::Train) {
        stats.add_tokens(&set.view(s.trace), s.tokens.clone());
    }
    dir.write_baselines(&stats)?;

    let device = opts.backend.device();
    let ad = device.clone().autodiff();
    let per_epoch = train_windows.len().div_ceil(st.batch_size).max(1);
    let total_steps = (per_epoch * st.max_epochs) as u64;
    let token_ids = crate::card::TokenIdUse::of(&stats, cfg.token_buckets);
    let resumed: Option<(u64, TrainProgress)> = ckpt.load_state()?;
    let (mut step, mut model, mut optim, mut prog) = match resumed {
        Some((step, p)) => {
            check_same_run(&p, opts, auto_shards, &ckpt)?;
            let mut p = p;
            (p.settings.max_epochs, p.settings.patience) = (st.max_epochs, st.patience);
            p.settings.checkpoint_every = st.checkpoint_every;
            p.finished = should_stop(&p, st, step, total_steps);
            let model = ckpt.load_model(step, ExpertPredictor::to_load(cfg, &ad))?;
            let optim = ckpt.load_optim(step, optimizer(&p.settings))?;
            (step, model, optim, p)
        }
        None => {
            let p = TrainProgress {
                config: cfg.clone(),
                traces: opts.traces.clone(),
                split: opts.split,
                settings: st.clone(),
                epoch: 0,
                step_in_epoch: 0,
                best_f1: -1.0,
                best_epoch: None,
                epochs_since_best: 0,
                finished: false,
                history: Vec::new(),
                elapsed_s: 0.0,
                epoch_loss: (0.0, 0),
                epoch_examples: 0,
            };
            (0, ExpertPredictor::new(cfg, &ad, st.seed), optimizer(st), p)
        }
    };
    let start_step = step;
    let stop = opts.run_steps.map(|r| start_step + r);
    let queries = cfg.training_queries();
    let bar = train_bar(opts.progress, total_steps, step);
    // Above a drawn bar, or as plain lines when there is none (not a terminal).
    let say = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}")
        } else {
            bar.println(line)
        }
    };
    if !prog.finished && prog.settings.shards > 1 {
        say(format!(
            "data-parallel: each step in {} shards of the batch, one per thread (--shards)",
            prog.settings.shards
        ));
    }
    if start_step > 0 && !prog.finished {
        say(format!(
            "resuming at epoch {} step {}",
            prog.epoch + 1,
            prog.step_in_epoch
        ));
    }
    let eval_opts = EvalOptions {
        batch_size: st.batch_size,
        baselines: false,
        ..EvalOptions::default()
    };
    let validate = |m: &ExpertPredictor| {
        evaluate(
            &m.valid(),
            Some(&stats),
            &set,
            Split::Validation,
            &device,
            &eval_opts,
        )
    };
    let mut validation = None;
    if step == 0 && prog.best_epoch.is_none() && cfg.token_dropout == 0.0 {
        // The untrained predictor is the first candidate: with the prior path it ranks as
        // the count baselines, so training can only keep or improve on them. Not with
        // token-id dropout: validation does not score the forecast before the id, which
        // only training teaches.
        let report = validate(&model)?;
        prog.best_f1 = micro_f1(&report);
        prog.best_epoch = Some(0);
        say(format!(
            "epoch   0  (untrained{})  val F1 {:.4}",
            if cfg.token_prior {
                ": the count prior"
            } else {
                ""
            },
            prog.best_f1
        ));
        dir.write_model(&model.valid())?;
        validation = Some(report);
    }
    while !prog.finished && stop.is_none_or(|s| step < s) {
        let order = epoch_order(&train_windows, st.seed, prog.epoch);
        let batches: Vec<&[Window]> = order.chunks(st.batch_size).collect();
        let epoch_start = Instant::now();
        let mut epoch_secs = 0.0;
        while prog.step_in_epoch < batches.len() && stop.is_none_or(|s| step < s) {
            let t0 = Instant::now();
            let mut batch = set.batch_with(
                batches[prog.step_in_epoch],
                cfg.token_buckets,
                cfg.features.hidden().then_some(cfg.router_input_dim),
            );
            hide_token_ids(&mut batch.tokens, cfg, st.seed, step);
            let targets: u64 = batch
                .target_mask
                .chunks(cfg.routing.n_moe)
                .filter(|m| m.iter().any(|&x| x > 0.0))
                .count() as u64;
            let qs = sample_queries(&queries, st, step);
            let denominators = query_denominators(&batch, &qs, cfg.routing);
            let shards = batch
                .split(prog.settings.shards)
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    BatchTensors::new(b, cfg.routing, &ad)
                        .with_dropout_seed(mix(mix(st.seed, step), i as u64))
                        .with_priors(&model, Some(&stats), &set, b, &qs, true)
                })
                .collect::<Result<Vec<_>>>()?;
            let (l, mut grads) =
                loss_and_gradients(&model, &shards, &qs, st.pos_weight, &denominators);
            clip_global_norm(&model, &mut grads, st.grad_clip);
            let lr = schedule(st, total_steps).lr_at(step);
            model = optim.step(lr, model, grads);
            if !l.is_finite() {
                return Err(PredictorError::Invalid(format!(
                    "training diverged at step {step} (loss {l}); lower --lr"
                )));
            }
            let dt = t0.elapsed().as_secs_f64();
            epoch_secs += dt;
            step += 1;
            prog.step_in_epoch += 1;
            prog.elapsed_s += dt;
            prog.epoch_loss.0 += l;
            prog.epoch_loss.1 += 1;
            prog.epoch_examples += targets;
            bar.set_position(step);
            bar.set_message(format!(
                "epoch {} loss {l:.4} lr {lr:.1e} {:.0} ex/s best val F1 {:.4}",
                prog.epoch + 1,
                targets as f64 / dt,
                prog.best_f1.max(0.0)
            ));
            if step.is_multiple_of(st.checkpoint_every as u64) && prog.step_in_epoch < batches.len()
            {
                ckpt.save(step, &model, &optim, &prog)?;
                model = fresh_leaves(model);
            }
        }
        if prog.step_in_epoch < batches.len() {
            ckpt.save(step, &model, &optim, &prog)?;
            break;
        }
        let report = validate(&model)?;
        let f1 = micro_f1(&report);
        let rec = EpochRecord {
            epoch: prog.epoch + 1,
            train_loss: prog.epoch_loss.0 / prog.epoch_loss.1.max(1) as f64,
            val_f1: f1,
            seconds: epoch_start.elapsed().as_secs_f64().max(epoch_secs),
            examples_per_s: prog.epoch_examples as f64 / epoch_secs.max(1e-9),
            steps_per_s: prog.epoch_loss.1 as f64 / epoch_secs.max(1e-9),
        };
        say(format!(
            "epoch {:>3}  train loss {:.4}  val F1 {:.4}  {:.0} ex/s  {:.2} steps/s",
            rec.epoch, rec.train_loss, rec.val_f1, rec.examples_per_s, rec.steps_per_s
        ));
        prog.history.push(rec);
        // Ties go to the later epoch: a count prior can saturate validation F1 from the
        // first epoch while training still improves what F1 does not score (the
        // forecast before the id, the calibration of the probabilities).
        if f1 >= prog.best_f1 {
            prog.best_f1 = f1;
            prog.best_epoch = Some(prog.epoch + 1);
            prog.epochs_since_best = 0;
            dir.write_model(&model.valid())?;
            validation = Some(report);
        } else {
            prog.epochs_since_best += 1;
        }
        prog.epoch += 1;
        prog.step_in_epoch = 0;
        prog.epoch_loss = (0.0, 0);
        prog.epoch_examples = 0;
        if should_stop(&prog, st, step, total_steps) {
            prog.finished = true;
        }
        dir.write_card(&PredictorCard::new(
            &prog,
            set.meta().clone(),
            validation.as_ref(),
            &model,
            token_ids,
        ))?;
        ckpt.save(step, &model, &optim, &prog)?;
        model = fresh_leaves(model);
    }
    bar.finish_and_clear();
    if prog.finished && validation.is_none() {
        validation = dir.read_card().ok().and_then(|c| c.validation);
    }
    Ok(TrainSummary {
        start_step,
        end_step: step,
        finished: prog.finished,
        best_f1: prog.best_f1,
        history: prog.history,
        validation,
    })
}

/// Token-id embedding rows when none are asked for: the largest id in the traces + 1,
/// so no two ids share a row.
pub fn auto_token_buckets(set: &ExampleSet) -> usize {
    (0..set.paths().len())
        .flat_map(|i| set.view(i).token.iter().copied())
        .filter(|&t| t != datasets::UNKNOWN_TOKEN)
        .max()
        .map_or(1, |m| m as usize + 1)
}

/// Predictors that read router inputs need them, of their width, in every trace.
pub fn check_router_inputs(cfg: &crate::PredictorConfig, set: &ExampleSet) -> Result<()> {
    for (i, path) in set.paths().iter().enumerate() {
        cfg.check_router_input_dim(set.view(i).meta.router_input_dim())
            .map_err(|e| PredictorError::file(path, e))?;
    }
    Ok(())
}

/// Micro-averaged F1 over all groups of the predictor.
pub fn micro_f1(r: &EvalReport) -> f64 {
    let p = &r.methods[0];
    let (mut num, mut den) = (0.0, 0.0);
    for g in &p.groups {
        num += g.overall.f1 * g.overall.sets as f64;
        den += g.overall.sets as f64;
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// The same weights as new autodiff leaves (parameter ids, and so the optimiser state,
/// kept). Called after every validation, export and checkpoint: whatever those left
/// attached to the parameters' old graph nodes can no longer keep a graph alive, whose
/// sweep after every backward pass (burn-autodiff's orphan cleanup) would otherwise grow
/// with the run.
fn fresh_leaves(model: ExpertPredictor) -> ExpertPredictor {
    model.valid().train()
}

/// Token-id dropout: each position's id becomes the unknown row with probability
/// `token_dropout` (seeded per step), so the predictor learns to forecast a token whose
/// id is not sampled yet.
fn hide_token_ids(tokens: &mut [i64], cfg: &PredictorConfig, seed: u64, step: u64) {
    if cfg.token_dropout <= 0.0 {
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7f4a_7c15_u64.wrapping_mul(step + 1));
    let unknown = datasets::examples::token_bucket(datasets::UNKNOWN_TOKEN, cfg.token_buckets);
    for t in tokens.iter_mut() {
        if rng.random_bool(cfg.token_dropout) {
            *t = unknown;
        }
    }
}

fn sample_queries(all: &[Query], st: &TrainSettings, step: u64) -> Vec<Query> {
    if all.len() <= st.queries_per_batch {
        return all.to_vec();
    }
    let mut rng = StdRng::seed_from_u64(st.seed.wrapping_mul(31).wrapping_add(step));
    all.choose_multiple(&mut rng, st.queries_per_batch)
        .copied()
        .collect()
}

fn train_bar(show: bool, total: u64, pos: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    b.set_position(pos);
    b
}

/// Whether the checkpoint in `ckpt` is of the run `o` asks for; with `auto_shards` (the
/// shard count not given) the checkpoint's shard count is kept.
fn check_same_run(
    p: &TrainProgress,
    o: &TrainOptions,
    auto_shards: bool,
    ckpt: &CheckpointDir,
) -> Result<()> {
    let mut diffs = Vec::new();
    if p.config != o.config {
        diffs.push("predictor shape or task");
    }
    if p.traces != o.traces {
        diffs.push("trace files");
    }
    if p.split != o.split {
        diffs.push("split");
    }
    let (mut a, mut b) = (p.settings.clone(), o.settings.clone());
    (a.max_epochs, a.patience, a.checkpoint_every) = (0, 0, 0);
    (b.max_epochs, b.patience, b.checkpoint_every) = (0, 0, 0);
    if auto_shards {
        b.shards = a.shards;
    }
    if a != b {
        diffs.push("optimiser settings");
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(PredictorError::file(
        ckpt.path(),
        format!(
            "holds a checkpoint of a different run ({}); use another -o or remove the folder",
            diffs.join(", ")
        ),
    ))
}
