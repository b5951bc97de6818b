//! Helpers shared by the predictor's integration tests.

use std::path::Path;

use datasets::examples::{ExampleSet, Split};
use predictor::device::BackendKind;
use predictor::{evaluate, EvalOptions, LoadedPredictor};

/// The predictor in `dir` and its baselines, evaluated on the test split it recorded
/// for `trace`.
pub fn eval_test_split(dir: &Path, trace: &Path) -> predictor::EvalReport {
    let dev = BackendKind::from_test_env().device();
    let p = LoadedPredictor::load(dir, &dev).unwrap();
    let set = ExampleSet::open(&[trace.to_path_buf()], &p.card.split).unwrap();
    evaluate(
        &p.model,
        p.baselines.as_ref(),
        &set,
        Split::Test,
        &dev,
        &EvalOptions::default(),
    )
    .unwrap()
}
