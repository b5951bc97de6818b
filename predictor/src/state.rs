//! Crash-safe files: atomic writes, and resumable training checkpoints of any Burn
//! module with its optimizer (`model-STEP.bpk`, `optim-STEP.bpk` and a JSON state file
//! that names the step and is replaced last, so an interrupted save leaves the previous
//! checkpoint intact).

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{PredictorError, Result};

/// Writes `bytes` to `path` through a temporary file, fsync and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    datasets::store::write_atomic(path, |w| {
        w.write_all(bytes)
            .map_err(|e| datasets::TraceError::io(path, e))
    })?;
    Ok(())
}

/// `path` with `.tmp` appended to its file name.
pub fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn sync(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| PredictorError::io(path, e))
}

/// Saves a module's record (burnpack) atomically.
pub fn save_module<M: Module>(module: &M, path: &Path) -> Result<()> {
    let tmp = tmp_name(path);
    module
        .clone()
        .into_record()
        .save(&tmp)
        .map_err(|e| PredictorError::file(&tmp, e.to_string()))?;
    sync(&tmp)?;
    fs::rename(&tmp, path).map_err(|e| PredictorError::io(path, e))
}

/// Loads a record saved by [`save_module`] into `module` (same structure). The file is
/// read whole, so it may be replaced afterwards.
pub fn load_module<M: Module>(module: M, path: &Path) -> Result<M> {
    let record = ModuleRecord::from_bytes(read_bytes(path)?)
        .map_err(|e| PredictorError::file(path, e.to_string()))?;
    module
        .try_load_record(record)
        .map_err(|e| PredictorError::file(path, format!("does not fit this model: {e}")))
}

/// Saves an optimizer's state (burnpack) atomically.
pub fn save_optim(optim: &ModuleOptimizer, path: &Path) -> Result<()> {
    let tmp = tmp_name(path);
    optim
        .save(&tmp)
        .map_err(|e| PredictorError::file(&tmp, e.to_string()))?;
    sync(&tmp)?;
    fs::rename(&tmp, path).map_err(|e| PredictorError::io(path, e))
}

/// Loads an optimizer state saved by [`save_optim`] into `optim` (built for the loaded
/// model: its parameter groups name the loaded parameter ids).
pub fn load_optim(optim: ModuleOptimizer, path: &Path) -> Result<ModuleOptimizer> {
    optim
        .from_bytes(read_bytes(path)?)
        .map_err(|e| PredictorError::file(path, e.to_string()))
}

/// Removes `prefix-*.bpk` / `.tmp` records in `dir` except those in `keep`.
pub fn remove_old_records(dir: &Path, prefixes: &[&str], keep: &[PathBuf]) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let ours = prefixes.iter().any(|pre| name.starts_with(pre))
                && (name.ends_with(".bpk") || name.ends_with(".tmp"));
            if ours && !keep.contains(&p) {
                let _ = fs::remove_file(&p);
            }
        }
    }
}

/// The whole file in memory. Burn's file loaders read tensors lazily by path, and a
/// parameter that gets no gradient would still point at a record file the next
/// checkpoint deletes.
fn read_bytes(path: &Path) -> Result<Bytes> {
    let v = fs::read(path).map_err(|e| PredictorError::io(path, e))?;
    Ok(Bytes::from_bytes_vec(v))
}

/// A folder of resumable training checkpoints.
pub struct CheckpointDir {
    dir: PathBuf,
}

impl CheckpointDir {
    /// The checkpoint folder `dir` (created on the first save).
    pub fn new(dir: PathBuf) -> Self {
        CheckpointDir { dir }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn model_file(&self, step: u64) -> PathBuf {
        self.dir.join(format!("model-{step:08}.bpk"))
    }

    fn optim_file(&self, step: u64) -> PathBuf {
        self.dir.join(format!("optim-{step:08}.bpk"))
    }

    /// Saves model, optimizer and `state` under `step`, then removes older records.
    pub fn save<M: Module, S: Serialize>(
        &self,
        step: u64,
        model: &M,
        optim: &ModuleOptimizer,
        state: &S,
    ) -> Result<()> {
        fs::create_dir_all(&self.dir).map_err(|e| PredictorError::io(&self.dir, e))?;
        let (mf, of) = (self.model_file(step), self.optim_file(step));
        save_module(model, &mf)?;
        save_optim(optim, &of)?;
        let json = serde_json::to_string_pretty(&Stepped { step, state })
            .map_err(|e| PredictorError::Invalid(format!("training state: {e}")))?;
        write_atomic(&self.state_file(), json.as_bytes())?;
        remove_old_records(&self.dir, &["model-", "optim-"], &[mf, of]);
        Ok(())
    }

    /// The saved state and its step, if any.
    pub fn load_state<S: DeserializeOwned>(&self) -> Result<Option<(u64, S)>> {
        let path = self.state_file();
        if !path.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&path).map_err(|e| PredictorError::io(&path, e))?;
        let s: Stepped<S> = serde_json::from_str(&text)
            .map_err(|e| PredictorError::file(&path, format!("bad training state: {e}")))?;
        Ok(Some((s.step, s.state)))
    }

    /// Loads the model record of `step` into `model`.
    pub fn load_model<M: Module>(&self, step: u64, model: M) -> Result<M> {
        load_module(model, &self.model_file(step))
    }

    /// Loads the optimizer record of `step` into `optim` (built for the loaded model).
    pub fn load_optim(&self, step: u64, optim: ModuleOptimizer) -> Result<ModuleOptimizer> {
        load_optim(optim, &self.optim_file(step))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Stepped<S> {
    step: u64,
    #[serde(flatten)]
    state: S,
}
