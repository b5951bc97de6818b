//! Helpers shared by the predictor's integration tests: traces with a known rule, the
//! training options the tests share, and the checks that online forecasts equal the
//! batched forward. Not every test binary uses every helper.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::activation::sigmoid;
use datasets::examples::{ExampleSet, RoutingShape, Split, SplitConfig};
use datasets::{save_trace, Phase, TokenRecord, TraceBuilder, TraceFormat, TraceMeta};
use predictor::batch::BatchTensors;
use predictor::device::BackendKind;
use predictor::{
    evaluate, EvalOptions, ExpertForecast, LoadedPredictor, OnlinePredictor, PredictorConfig,
    Query, Task, TrainOptions, TrainSettings,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

pub const E: u32 = 8;
pub const LAYERS: u32 = 4;

/// Trace metadata of the rule traces: `LAYERS` MoE layers of `E` experts, top-2.
pub fn rule_meta(model: &str, router_input_dim: Option<u32>) -> TraceMeta {
    TraceMeta {
        channels: router_input_dim
            .map(datasets::Channel::router_inputs)
            .into_iter()
            .collect(),
        model: model.into(),
        architecture: None,
        n_layers: LAYERS,
        moe_layers: (0..LAYERS).collect(),
        n_experts: E,
        top_k: 2,
        n_shared_experts: 0,
        source: None,
        tokenizer: None,
        ranked: false,
        expert_bytes: None,
    }
}

/// Next-token rule: token `x` uses experts `{x, x+3} mod E` at layer `m`, shifted by
/// `m`. Lookahead rule: layer 0 is random; layer `m+1` is layer `m` shifted by `m+1`.
pub fn rule_trace(path: &Path, rule: Task, seqs: usize, len: usize, seed: u64) -> PathBuf {
    let mut b = TraceBuilder::new(rule_meta("rule", None), false).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for s in 0..seqs {
        for pos in 0..len {
            let token: u32 = rng.random_range(0..40);
            let mut layers = Vec::new();
            let first = rng.random_range(0..E);
            for m in 0..LAYERS {
                let base = match rule {
                    Task::NextToken => token + m,
                    Task::Lookahead => first + m * (m + 1) / 2,
                };
                let mut set = vec![base % E, (base + 3) % E];
                set.sort();
                layers.push(Some(set));
            }
            b.push(&TokenRecord {
                channels: Default::default(),
                seq: format!("s{s}"),
                pos: pos as u32,
                phase: Phase::Decode,
                token: Some(token),
                experts: layers,
                weights: None,
            })
            .unwrap();
        }
    }
    save_trace(&b.finish().unwrap(), path, Some(TraceFormat::Binary)).unwrap();
    path.to_path_buf()
}

pub fn options(trace: PathBuf, task: Task, out: PathBuf, epochs: usize) -> TrainOptions {
    let shape = RoutingShape {
        n_moe: LAYERS as usize,
        n_experts: E as usize,
        top_k: 2,
    };
    TrainOptions {
        traces: vec![trace],
        config: PredictorConfig::new(shape, task)
            .with_d_model(32)
            .with_n_layers(1)
            .with_n_heads(2)
            .with_context(16)
            .with_token_buckets(64)
            .with_dropout(0.0),
        split: SplitConfig {
            validation: 0.15,
            test: 0.15,
            seed: 1,
        },
        settings: TrainSettings {
            batch_size: 8,
            lr: 1e-2,
            warmup_steps: 10,
            max_epochs: epochs,
            patience: epochs,
            checkpoint_every: 7,
            // Pinned: the default (one shard per thread) would make the trained
            // weights, and the thresholds on them, depend on the machine's cores.
            shards: 2,
            ..TrainSettings::default()
        },
        backend: BackendKind::from_test_env(),
        out,
        progress: false,
        run_steps: None,
    }
}

pub fn f1_of(r: &predictor::EvalReport, method: &str, group: usize) -> f64 {
    r.method(method).unwrap().groups[group].overall.f1
}

/// Checks that the forecasts `forecast` makes online (token by token, observing each
/// token's routing after it) equal the batched forward over the first test window of
/// `trace` for every query trained (next token first), to 1e-4 (`input_dim`: batch the
/// router inputs too), at the tokens `forecast_at` names (the others are only observed).
pub fn assert_online_matches_batched(
    dir: &Path,
    trace: &Path,
    input_dim: Option<usize>,
    forecast_at: &dyn Fn(usize) -> bool,
    mut forecast: impl FnMut(
        &mut OnlinePredictor,
        &datasets::TraceView<'_>,
        usize,
        u32,
        &[&[u16]],
        Query,
    ) -> ExpertForecast,
) {
    let dev = BackendKind::from_test_env().device();
    let loaded = LoadedPredictor::load(dir, &dev).unwrap();
    let set = ExampleSet::open_for_test(&[trace.to_path_buf()], None).unwrap();
    let w = set.windows(Split::Test, 16)[0];
    assert_eq!((w.start, w.first_target), (0, 0));
    let batch = set.batch_with(&[w], loaded.card.config.token_buckets, input_dim);
    let queries = loaded.card.config.training_queries();
    let bt = BatchTensors::new(&batch, loaded.card.config.routing, &dev)
        .with_priors(
            &loaded.model,
            loaded.baselines.as_ref(),
            &set,
            &batch,
            &queries,
            false,
        )
        .unwrap();
    let batched: Vec<Vec<f32>> = loaded
        .model
        .forward_queries(&bt, &queries)
        .into_iter()
        .map(|z| sigmoid(z).try_into_vec_as::<f32>().unwrap())
        .collect();
    let view = set.view(0);
    let mut online = OnlinePredictor::new(loaded);
    for t in 0..w.len {
        let token = view.token[t];
        let layers: Vec<&[u16]> = (0..LAYERS as usize)
            .map(|m| view.layer(t, m).unwrap())
            .collect();
        for (qi, q) in queries.iter().enumerate().filter(|_| forecast_at(t)) {
            let f = forecast(&mut online, &view, t, token, &layers, *q);
            let width = q.horizon * E as usize;
            let want = &batched[qi][t * width..(t + 1) * width];
            for (a, b) in f.probs.iter().zip(want) {
                assert!((a - b).abs() < 1e-4, "token {t} query {q:?}: {a} vs {b}");
            }
        }
        let routing: Vec<Option<&[u16]>> = layers.iter().map(|l| Some(*l)).collect();
        online.observe(token, &routing).unwrap();
    }
}

/// Checks [`OnlinePredictor::predict_next_unknown`] at every position of the first test
/// window of `trace` against the batched forward with that position's id hidden.
pub fn assert_unknown_id_matches_batched(dir: &Path, trace: &Path) {
    let dev = BackendKind::from_test_env().device();
    let loaded = LoadedPredictor::load(dir, &dev).unwrap();
    let c = loaded.card.config.clone();
    let set = ExampleSet::open_for_test(&[trace.to_path_buf()], None).unwrap();
    let w = set.windows(Split::Test, 16)[0];
    let view = set.view(0);
    let q = Query {
        known: 0,
        horizon: LAYERS as usize,
    };
    let batched: Vec<Vec<f32>> = (0..w.len)
        .map(|t| {
            let mut batch = set.batch_with(&[w], c.token_buckets, Some(c.router_input_dim));
            batch.tokens[t] = c.token_buckets as i64;
            let bt = BatchTensors::new(&batch, c.routing, &dev)
                .with_priors(
                    &loaded.model,
                    loaded.baselines.as_ref(),
                    &set,
                    &batch,
                    &[q],
                    false,
                )
                .unwrap();
            let z = loaded.model.forward_queries(&bt, &[q]).remove(0);
            let width = LAYERS as usize * E as usize;
            sigmoid(z.narrow(0, t, 1).reshape([width]))
                .try_into_vec_as::<f32>()
                .unwrap()
        })
        .collect();
    let mut online = OnlinePredictor::new(loaded);
    for (t, want) in batched.iter().enumerate() {
        let f = online.predict_next_unknown().unwrap();
        for (a, b) in f.probs.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "token {t} before its id: {a} vs {b}");
        }
        let layers: Vec<Option<&[u16]>> = (0..LAYERS as usize).map(|m| view.layer(t, m)).collect();
        online.observe(view.token[t], &layers).unwrap();
    }
}
