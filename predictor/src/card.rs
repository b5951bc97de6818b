//! A predictor checkpoint directory: self-describing, loadable without autodiff.
//!
//! ```text
//! OUT/predictor.json        what it is: config, task, the trace meta it was trained for,
//!                           training settings, history, validation metrics
//! OUT/model.bpk             the best weights (burnpack)
//! OUT/baselines.safetensors baseline counts fitted on the same training split
//! OUT/train-state/          resumable training checkpoints
//! ```

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Device;
use datasets::TraceMeta;
use serde::{Deserialize, Serialize};

use crate::baselines::BaselineStats;
use crate::config::PredictorConfig;
use crate::error::{PredictorError, Result};
use crate::eval::EvalReport;
use crate::model::ExpertPredictor;
use crate::state::{load_module, save_module, write_atomic};
use crate::train::{EpochRecord, TrainProgress, TrainSettings};

/// Format tag of `predictor.json`.
pub const FORMAT: &str = "moecast-predictor/1";

/// Config fields added after cards were first written, with the value that keeps an
/// older card's behaviour (filled in when a card lacks them).
fn config_additions() -> [(&'static str, serde_json::Value); 2] {
    [
        ("token_dropout", serde_json::json!(0.0)),
        ("token_prior", serde_json::json!(false)),
    ]
}

/// The contents of `predictor.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PredictorCard {
    pub format: String,
    pub config: PredictorConfig,
    /// Metadata of the (first) training trace: the model the predictor is for.
    pub trace_meta: TraceMeta,
    pub traces: Vec<PathBuf>,
    pub split: datasets::examples::SplitConfig,
    pub settings: TrainSettings,
    pub n_params: usize,
    pub epochs: usize,
    pub best_epoch: Option<usize>,
    /// True when training stopped (early stopping or the epoch limit).
    pub finished: bool,
    pub training_seconds: f64,
    pub history: Vec<EpochRecord>,
    /// Validation report of the best epoch.
    pub validation: Option<EvalReport>,
    /// How the training split's token ids map onto embedding rows (cards written before
    /// it have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<TokenIdUse>,
}

/// Token ids of the training split against the embedding rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenIdUse {
    /// Distinct ids seen.
    pub seen: usize,
    /// Embedding rows (ids are folded modulo this).
    pub buckets: usize,
    /// Seen ids whose row is shared with another seen id.
    pub sharing_a_row: usize,
}

impl TokenIdUse {
    /// The use of `buckets` rows by the ids counted in `stats`' token table.
    pub fn of(stats: &BaselineStats, buckets: usize) -> Option<Self> {
        let table = stats.token_table.as_ref()?;
        let mut per_row = std::collections::HashMap::<usize, usize>::new();
        for &id in table.rows.keys() {
            *per_row.entry(id as usize % buckets.max(1)).or_default() += 1;
        }
        Some(TokenIdUse {
            seen: table.rows.len(),
            buckets,
            sharing_a_row: per_row.values().filter(|&&n| n > 1).sum(),
        })
    }
}

impl PredictorCard {
    /// The card of a run in progress.
    pub fn new(
        p: &TrainProgress,
        trace_meta: TraceMeta,
        validation: Option<&EvalReport>,
        model: &ExpertPredictor,
        token_ids: Option<TokenIdUse>,
    ) -> Self {
        PredictorCard {
            format: FORMAT.into(),
            config: p.config.clone(),
            trace_meta,
            traces: p.traces.clone(),
            split: p.split,
            settings: p.settings.clone(),
            n_params: model.num_params(),
            epochs: p.history.len(),
            best_epoch: p.best_epoch,
            finished: p.finished,
            training_seconds: p.elapsed_s,
            history: p.history.clone(),
            validation: validation.cloned(),
            token_ids,
        }
    }
}

/// Paths of a predictor directory.
#[derive(Debug, Clone)]
pub struct PredictorDir {
    dir: PathBuf,
}

impl PredictorDir {
    pub fn new(dir: PathBuf) -> Self {
        PredictorDir { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn card_file(&self) -> PathBuf {
        self.dir.join("predictor.json")
    }

    pub fn model_file(&self) -> PathBuf {
        self.dir.join("model.bpk")
    }

    pub fn baselines_file(&self) -> PathBuf {
        self.dir.join("baselines.safetensors")
    }

    pub fn train_state(&self) -> PathBuf {
        self.dir.join("train-state")
    }

    pub fn write_card(&self, card: &PredictorCard) -> Result<()> {
        let json = serde_json::to_string_pretty(card)
            .map_err(|e| PredictorError::Invalid(format!("predictor card: {e}")))?;
        write_atomic(&self.card_file(), json.as_bytes())
    }

    pub fn read_card(&self) -> Result<PredictorCard> {
        let path = self.card_file();
        if !path.exists() {
            return Err(PredictorError::file(
                &self.dir,
                "not a predictor checkpoint (no predictor.json; train one with `moecast train`)",
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| PredictorError::io(&path, e))?;
        let malformed = |e: serde_json::Error| {
            PredictorError::file(&path, format!("malformed predictor card: {e}"))
        };
        let mut value: serde_json::Value = serde_json::from_str(&text).map_err(malformed)?;
        if let Some(config) = value.get_mut("config").and_then(|c| c.as_object_mut()) {
            for (field, old_behaviour) in config_additions() {
                config.entry(field).or_insert(old_behaviour);
            }
        }
        let card: PredictorCard = serde_json::from_value(value).map_err(malformed)?;
        if card.format != FORMAT {
            return Err(PredictorError::file(
                &path,
                format!("format '{}' is not {FORMAT}", card.format),
            ));
        }
        card.config
            .validate()
            .map_err(|m| PredictorError::file(&path, m))?;
        Ok(card)
    }

    pub fn write_model(&self, model: &ExpertPredictor) -> Result<()> {
        save_module(model, &self.model_file())
    }

    pub fn write_baselines(&self, stats: &BaselineStats) -> Result<()> {
        write_atomic(&self.baselines_file(), &stats.to_safetensors()?)
    }

    /// The counts stored beside the predictor, read with the shape its card gives.
    pub fn read_counts(&self) -> Result<BaselineStats> {
        let card = self.read_card()?;
        self.read_baselines(&card)
    }

    pub fn read_baselines(&self, card: &PredictorCard) -> Result<BaselineStats> {
        let path = self.baselines_file();
        let bytes = std::fs::read(&path).map_err(|e| PredictorError::io(&path, e))?;
        BaselineStats::from_safetensors(&bytes, card.config.routing, &path)
    }
}

/// A predictor loaded for inference (no autodiff) with its card and baselines.
#[derive(Clone)]
pub struct LoadedPredictor {
    pub card: PredictorCard,
    pub model: ExpertPredictor,
    pub baselines: Option<BaselineStats>,
    pub device: Device,
}

impl LoadedPredictor {
    /// Loads `dir` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let pd = PredictorDir::new(dir.to_path_buf());
        let card = pd.read_card()?;
        let model_file = pd.model_file();
        if !model_file.exists() {
            return Err(PredictorError::file(
                dir,
                "has no model.bpk yet (training has not finished an epoch)",
            ));
        }
        let model = load_module(ExpertPredictor::to_load(&card.config, device), &model_file)?;
        let baselines = if pd.baselines_file().exists() {
            Some(pd.read_baselines(&card)?)
        } else if card.config.token_prior {
            return Err(PredictorError::file(
                &pd.baselines_file(),
                "missing: this predictor adds the token table's prior, which is stored there",
            ));
        } else {
            None
        };
        Ok(LoadedPredictor {
            card,
            model,
            baselines,
            device: device.clone(),
        })
    }
}

/// The examples `moecast eval` scores: with `all`, every sequence of `traces` (notes say
/// which of them the predictor was trained on); else the predictor's own held-out test
/// split of `traces` (default: its training traces). Returns the set and those notes.
pub fn evaluation_set(
    card: &PredictorCard,
    traces: &[PathBuf],
    all: bool,
) -> Result<(datasets::examples::ExampleSet, Vec<String>)> {
    use datasets::examples::{ExampleSet, Split};
    let same_file =
        |a: &std::path::Path, b: &std::path::Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => a == b,
        };
    let mut notes = Vec::new();
    let set = if all {
        if traces.is_empty() {
            return Err(PredictorError::Invalid(
                "give --trace FILE... (or --split test for the predictor's own test split)".into(),
            ));
        }
        for t in traces {
            if card.traces.iter().any(|c| same_file(c, t)) {
                notes.push(format!(
                    "{} was used for training; its training sequences are part of this evaluation \
                     (use --split test for its held-out sequences)",
                    t.display()
                ));
            }
        }
        ExampleSet::open_for_test(traces, Some(card.config.routing))?
    } else {
        let traces = if traces.is_empty() {
            &card.traces[..]
        } else {
            traces
        };
        let set = ExampleSet::open(traces, &card.split)?;
        if set.split_tokens(Split::Test) == 0 {
            return Err(PredictorError::Invalid(
                "the predictor was trained with --test-fraction 0: no test split; pass --split all --trace TEST".into(),
            ));
        }
        set
    };
    card.config.routing.check(set.meta(), &set.paths()[0])?;
    if card.trace_meta.model != set.meta().model {
        notes.push(format!(
            "the predictor was trained on traces of '{}', these are of '{}'",
            card.trace_meta.model,
            set.meta().model
        ));
    }
    Ok((set, notes))
}
