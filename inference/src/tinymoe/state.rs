//! Resumable training state in `OUT/train-state/`: the model and optimizer records
//! (burnpack, named by step), the tokenizer, and `state.json`, which names the step and
//! is replaced last. Every file is written to a temporary name and renamed, so a crash
//! or Ctrl-C at any moment leaves the previous checkpoint intact.

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use serde::{Deserialize, Serialize};

use super::model::TinyMoe;
use super::TinyMoeConfig;
use crate::error::{ModelError, Result};

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

fn record_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::file(path, e.to_string())
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_name(path);
    fs::write(&tmp, bytes).map_err(|e| ModelError::io(&tmp, e))?;
    sync(&tmp)?;
    fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn sync(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ModelError::io(path, e))
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
    fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
    let tok = dir.join("tokenizer.json");
    if !tok.exists() {
        write_atomic(&tok, tokenizer_json.as_bytes())?;
    }
    let (mf, of) = (model_file(&dir, state.step), optim_file(&dir, state.step));
    let tmp = tmp_name(&mf);
    model
        .clone()
        .into_record()
        .save(&tmp)
        .map_err(|e| record_err(&tmp, e))?;
    sync(&tmp)?;
    fs::rename(&tmp, &mf).map_err(|e| ModelError::io(&mf, e))?;
    let tmp = tmp_name(&of);
    optim.save(&tmp).map_err(|e| record_err(&tmp, e))?;
    sync(&tmp)?;
    fs::rename(&tmp, &of).map_err(|e| ModelError::io(&of, e))?;
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    write_atomic(&dir.join("state.json"), json.as_bytes())?;
    // Older records are garbage once state.json names the new step.
    let keep = [mf, of];
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let ours = (name.starts_with("model-") || name.starts_with("optim-"))
                && (name.ends_with(".bpk") || name.ends_with(".tmp"));
            if ours && !keep.contains(&p) {
                let _ = fs::remove_file(&p);
            }
        }
    }
    Ok(())
}

/// Reads `state.json` of `out`, if there is one.
pub fn load_state(out: &Path) -> Result<Option<TrainState>> {
    let path = state_dir(out).join("state.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let state = serde_json::from_str(&text)
        .map_err(|e| ModelError::file(&path, format!("bad training state: {e}")))?;
    Ok(Some(state))
}

/// Loads the model record of `state.step` into `model` (parameter ids included).
pub fn load_model_record(out: &Path, state: &TrainState, model: TinyMoe) -> Result<TinyMoe> {
    let mf = model_file(&state_dir(out), state.step);
    let record = ModuleRecord::from_bytes(read_bytes(&mf)?).map_err(|e| record_err(&mf, e))?;
    model
        .try_load_record(record)
        .map_err(|e| record_err(&mf, e))
}

/// Loads the optimizer record of `state.step` into `optim`, which must have been built
/// for the loaded model (its parameter groups name the loaded parameter ids).
pub fn load_optim_record(
    out: &Path,
    state: &TrainState,
    optim: ModuleOptimizer,
) -> Result<ModuleOptimizer> {
    let of = optim_file(&state_dir(out), state.step);
    optim
        .from_bytes(read_bytes(&of)?)
        .map_err(|e| record_err(&of, e))
}

/// The whole file in memory. Burn's file loaders read tensors lazily by path, and a
/// parameter that gets no gradient (an unused expert) would still point at a record file
/// the next checkpoint deletes.
fn read_bytes(path: &Path) -> Result<Bytes> {
    let v = fs::read(path).map_err(|e| ModelError::io(path, e))?;
    Ok(Bytes::from_bytes_vec(v))
}

/// Loads the model saved in `out`'s training state onto `device` (for inspection and
/// tests: the exact f32 weights the export was made from).
pub fn load_model(out: &Path, device: &burn::tensor::Device) -> Result<TinyMoe> {
    let state = load_state(out)?.ok_or_else(|| {
        ModelError::file(&state_dir(out), "no training state (state.json) to load")
    })?;
    load_model_record(out, &state, TinyMoe::init(&state.model, state.seed, device))
}
