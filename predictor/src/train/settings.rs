//! What a training run is asked for (options and optimisation settings), what it keeps
//! to resume (progress, one record per epoch), and what it reports.

use std::path::{Path, PathBuf};

use datasets::examples::SplitConfig;
use serde::{Deserialize, Serialize};

use crate::config::PredictorConfig;
use crate::device::BackendKind;
use crate::eval::EvalReport;

/// Optimisation settings (recorded in the checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Windows per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a share of the peak (cosine decay).
    pub min_lr_ratio: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Gradient clipping: the global L2 norm over every parameter (0: none).
    pub grad_clip: f64,
    /// Upper bound on epochs.
    pub max_epochs: usize,
    /// Stop after this many epochs without a better validation F1.
    pub patience: usize,
    /// Weight of the positive (expert chosen) class in the BCE.
    pub pos_weight: f64,
    /// Lookahead queries sampled per step (all when there are fewer).
    pub queries_per_batch: usize,
    /// Save a resumable checkpoint every this many steps (and after every epoch).
    pub checkpoint_every: usize,
    /// Seed of initialisation, dropout, shuffling and query sampling.
    pub seed: u64,
    /// Data-parallel shards per step (see [`crate::step`]); 0: one per CPU thread (1 on
    /// a GPU), resolved when the run starts and kept by its checkpoint. A run repeats
    /// exactly for the same shard count.
    #[serde(default = "one_shard")]
    pub shards: usize,
}

/// Checkpoints written before shards existed ran one.
fn one_shard() -> usize {
    1
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            batch_size: 16,
            lr: 5e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 100,
            weight_decay: 0.01,
            grad_clip: 1.0,
            max_epochs: 30,
            patience: 4,
            pos_weight: 1.0,
            queries_per_batch: 8,
            checkpoint_every: 500,
            seed: 0,
            shards: 0,
        }
    }
}

/// Everything [`super::train`] needs.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub traces: Vec<PathBuf>,
    pub config: PredictorConfig,
    pub split: SplitConfig,
    pub settings: TrainSettings,
    pub backend: BackendKind,
    /// Output directory (`checkpoints/NAME`).
    pub out: PathBuf,
    pub progress: bool,
    /// Stop after this many steps in this invocation (checkpointed; rerun to resume).
    pub run_steps: Option<u64>,
}

/// One finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    /// Validation F1 (micro over all forecast groups).
    pub val_f1: f64,
    pub seconds: f64,
    /// Target tokens per second of training.
    pub examples_per_s: f64,
    /// Optimiser steps per second (step time only).
    #[serde(default)]
    pub steps_per_s: f64,
}

/// The resumable part of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainProgress {
    pub config: PredictorConfig,
    pub traces: Vec<PathBuf>,
    pub split: SplitConfig,
    pub settings: TrainSettings,
    /// Epoch in progress (0-based) and steps of it already done.
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub best_f1: f64,
    pub best_epoch: Option<usize>,
    pub epochs_since_best: usize,
    pub finished: bool,
    pub history: Vec<EpochRecord>,
    pub elapsed_s: f64,
    /// Training loss sum and count of the epoch in progress.
    pub epoch_loss: (f64, usize),
    pub epoch_examples: u64,
}

/// What a [`super::train`] call did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub start_step: u64,
    pub end_step: u64,
    pub finished: bool,
    pub best_f1: f64,
    pub history: Vec<EpochRecord>,
    /// Validation report of the best epoch (when finished).
    pub validation: Option<EvalReport>,
}

impl TrainSummary {
    /// What `moecast train` prints at the end: how to resume an interrupted run, or the
    /// best epoch and its validation table. `out` is the predictor directory.
    pub fn describe(&self, out: &Path) -> String {
        if !self.finished {
            return format!(
                "stopped at step {} (epoch {}); rerun the same command to resume from {}\n",
                self.end_step,
                self.history.len() + 1,
                out.join("train-state").display()
            );
        }
        let mut text = String::new();
        if let Some(b) = self
            .history
            .iter()
            .max_by(|x, y| x.val_f1.total_cmp(&y.val_f1))
        {
            text += &format!(
                "trained {} epochs; best validation F1 {:.4} at epoch {} ({:.0} examples/s) -> {}\n",
                self.history.len(),
                b.val_f1,
                b.epoch,
                b.examples_per_s,
                out.display()
            );
        }
        if let Some(r) = &self.validation {
            text += &crate::eval::render_table(r);
        }
        text
    }
}
