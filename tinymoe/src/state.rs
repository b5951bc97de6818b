//! Resumable training state in `OUT/train-state/`: the model and optimizer records
//! (burnpack, named by step), the tokenizer, and `state.json`, which names the step and
//! is replaced last. Every file is written to a temporary name and renamed (the helpers
//! of [`predictor::state`]), so a crash or Ctrl-C at any moment leaves the previous
//! checkpoint intact.

use std::fs;
use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use predictor::state::{
    load_module, load_optim, remove_old_records, save_module, save_optim, write_atomic,
};
use serde::{Deserialize, Serialize};

use super::model::TinyMoe;
use super::TinyMoeConfig;
use crate::error::{Result, TinyMoeError};

/// One validation measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValPoint {
    /// Optimizer steps done when measured.
    pub step: usize,
    /// Mean training cross-entropy since the previous measurement.
    pub train_loss: f64,
    /// Validation cross-entropy.
    pub val_loss: f64,
}

/// What `state.json` records besides the weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// The model shape.
    pub model: TinyMoeConfig,
    /// The run's seed (initialisation, split, batches).
    pub seed: u64,
    /// Corpus files as given.
    pub corpus: Vec<PathBuf>,
    /// Held-out share of the documents.
    pub val_fraction: f64,
    /// Sequences per batch.
    pub batch_size: usize,
    /// Training wall time so far, seconds, over all sessions.
    pub elapsed_s: f64,
    /// Training tokens seen so far.
    pub tokens_seen: u64,
    /// Validation history.
    pub history: Vec<ValPoint>,
    /// Training cross-entropy of the most recent steps (at most 50).
    pub recent_losses: Vec<f64>,
}

/// The checkpoint folder of an output directory.
pub fn state_dir(out: &Path) -> PathBuf {
    out.join("train-state")
}

fn model_file(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("model-{step:08}.bpk"))
}

fn optim_file(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("optim-{step:08}.bpk"))
}

/// Saves the model, the optimizer and `state` (step `state.step`), then removes older
/// records. `tokenizer_json` is written once, when the folder has none.
pub fn save(
    out: &Path,
    model: &TinyMoe,
    optim: &ModuleOptimizer,
    state: &TrainState,
    tokenizer_json: &str,
) -> Result<()> {
    let dir = state_dir(out);
    fs::create_dir_all(&dir).map_err(|e| TinyMoeError::io(&dir, e))?;
    let tok = dir.join("tokenizer.json");
    if !tok.exists() {
        write_atomic(&tok, tokenizer_json.as_bytes())?;
    }
    let (mf, of) = (model_file(&dir, state.step), optim_file(&dir, state.step));
    save_module(model, &mf)?;
    save_optim(optim, &of)?;
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    write_atomic(&dir.join("state.json"), json.as_bytes())?;
    // Older records are garbage once state.json names the new step.
    remove_old_records(&dir, &["model-", "optim-"], &[mf, of]);
    Ok(())
}

/// Reads `state.json` of `out`, if there is one.
pub fn load_state(out: &Path) -> Result<Option<TrainState>> {
    let path = state_dir(out).join("state.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&path).map_err(|e| TinyMoeError::io(&path, e))?;
    let state = serde_json::from_str(&text)
        .map_err(|e| TinyMoeError::file(&path, format!("bad training state: {e}")))?;
    Ok(Some(state))
}

/// Loads the model record of `state.step` into `model` (parameter ids included).
pub fn load_model_record(out: &Path, state: &TrainState, model: TinyMoe) -> Result<TinyMoe> {
    Ok(load_module(
        model,
        &model_file(&state_dir(out), state.step),
    )?)
}

/// Loads the optimizer record of `state.step` into `optim`, which must have been built
/// for the loaded model (its parameter groups name the loaded parameter ids).
pub fn load_optim_record(
    out: &Path,
    state: &TrainState,
    optim: ModuleOptimizer,
) -> Result<ModuleOptimizer> {
    Ok(load_optim(optim, &optim_file(&state_dir(out), state.step))?)
}

/// Loads the model saved in `out`'s training state onto `device` (for inspection and
/// tests: the exact f32 weights the export was made from).
pub fn load_model(out: &Path, device: &burn::tensor::Device) -> Result<TinyMoe> {
    let state = load_state(out)?.ok_or_else(|| {
        TinyMoeError::file(&state_dir(out), "no training state (state.json) to load")
    })?;
    load_model_record(out, &state, TinyMoe::init(&state.model, state.seed, device))
}
