//! Training runs that must repeat exactly: a resumed run equals an uninterrupted one,
//! dropout and weight seeds do not depend on threads, and data-parallel shards give the
//! whole batch's loss and gradients.

mod common;

use common::{options, rule_trace};

use datasets::examples::{ExampleSet, RoutingShape, Split};
use predictor::batch::BatchTensors;
use predictor::{PredictorConfig, Task};

#[test]
fn resumed_training_matches_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let trace = rule_trace(&dir.path().join("t.mctrace"), Task::NextToken, 20, 24, 2);
    let full = options(trace.clone(), Task::NextToken, dir.path().join("full"), 3);
    let a = predictor::train(&full).unwrap();
    let mut part = options(trace, Task::NextToken, dir.path().join("part"), 3);
    part.run_steps = Some(5);
    let first = predictor::train(&part).unwrap();
    assert!(!first.finished && first.end_step == 5);
    part.run_steps = None;
    let b = predictor::train(&part).unwrap();
    assert!(b.finished && b.start_step == 5 && b.end_step == a.end_step);
    let f1 = |s: &predictor::TrainSummary| s.history.iter().map(|h| h.val_f1).collect::<Vec<_>>();
    assert_eq!(f1(&a), f1(&b));
    // A different run into the same folder is refused.
    let mut other = part.clone();
    other.settings.lr = 0.5;
    let err = predictor::train(&other).err().unwrap().to_string();
    assert!(err.contains("different run"), "{err}");
    // So is another shard count, while leaving it to the default resumes with the
    // checkpoint's.
    let mut other = part.clone();
    other.settings.shards = 5;
    let err = predictor::train(&other).err().unwrap().to_string();
    assert!(err.contains("different run"), "{err}");
}

/// Dropout masks come from seeds per step and shard, not from the device's generator
/// the shards' threads share: two runs with dropout and 3 shards are identical.
#[test]
fn training_with_dropout_repeats_exactly_over_shards() {
    let dir = tempfile::tempdir().unwrap();
    let trace = rule_trace(&dir.path().join("t.mctrace"), Task::NextToken, 20, 24, 5);
    let run = |name: &str| {
        let mut o = options(trace.clone(), Task::NextToken, dir.path().join(name), 2);
        o.config = o.config.with_dropout(0.3);
        o.settings.shards = 3;
        let summary = predictor::train(&o).unwrap();
        let epochs = summary.history.iter();
        epochs.map(|h| (h.train_loss, h.val_f1)).collect::<Vec<_>>()
    };
    let first = run("a");
    assert_eq!(first.len(), 2);
    assert_eq!(first, run("b"));
}

/// Burn's CPU generator is one per process: predictors built on several threads at once
/// (training runs or tests side by side) still get the weights of their own seed.
#[test]
fn predictors_built_at_once_get_the_weights_of_their_seed() {
    use predictor::model::ExpertPredictor;
    let shape = RoutingShape {
        n_moe: 4,
        n_experts: 16,
        top_k: 2,
    };
    let cfg = PredictorConfig::new(shape, Task::Lookahead).with_d_model(32);
    let device = burn::tensor::Device::flex();
    let weights = |seed: u64| {
        let m = ExpertPredictor::new(&cfg, &device, seed);
        let last = m
            .head_out
            .weight
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        (
            m.query_routing
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
            last,
        )
    };
    let alone = [weights(1), weights(2)];
    assert_ne!(alone[0], alone[1]);
    std::thread::scope(|s| {
        let builds: Vec<_> = (0..8u64)
            .map(|i| (i, s.spawn(move || weights(1 + i % 2))))
            .collect();
        for (i, b) in builds {
            assert!(b.join().unwrap() == alone[(i % 2) as usize], "build {i}");
        }
    });
}

/// A data-parallel step over shards of a batch gives the loss and gradients of the whole
/// batch in one piece (within float rounding), for every shard count.
#[test]
fn sharded_steps_equal_the_whole_batch() {
    use burn::tensor::Tensor;
    use predictor::model::ExpertPredictor;
    use predictor::step::{loss_and_gradients, query_denominators};
    let dir = tempfile::tempdir().unwrap();
    let trace = rule_trace(&dir.path().join("t.mctrace"), Task::Lookahead, 20, 24, 4);
    let opts = options(trace.clone(), Task::Lookahead, dir.path().join("p"), 1);
    let set = ExampleSet::open(&[trace], &opts.split).unwrap();
    // Without the count prior the output layer starts random, so every weight has a
    // gradient from the first step.
    let cfg = opts.config.with_token_prior(false);
    let ad = opts.backend.device().autodiff();
    let model = ExpertPredictor::new(&cfg, &ad, 3);
    let windows = set.windows(Split::Train, cfg.context);
    assert!(windows.len() >= 7, "{} windows", windows.len());
    let batch = set.batch(&windows[..7], cfg.token_buckets);
    let queries = cfg.training_queries();
    let denominators = query_denominators(&batch, &queries, cfg.routing);
    let step = |shards: usize| {
        let parts = batch.split(shards);
        assert_eq!(parts.len(), shards);
        assert_eq!(parts.iter().map(|p| p.batch).sum::<usize>(), 7);
        let bts: Vec<BatchTensors> = parts
            .iter()
            .map(|p| BatchTensors::new(p, cfg.routing, &ad))
            .collect();
        loss_and_gradients(&model, &bts, &queries, 1.5, &denominators)
    };
    let (loss, grads) = step(1);
    let params = [
        ("qkv", model.blocks[0].qkv.weight.id),
        ("ffn_in", model.blocks[0].ffn_in.weight.id),
        ("output", model.output.weight.id),
        ("context_routing", model.context_routing.weight.id),
        ("token_embed", model.token_embed.weight.id),
    ];
    let values = |g: &burn::optim::GradientsParams, id| -> Vec<f32> {
        let t: Tensor<2> = g.get(id).expect("a gradient");
        t.into_data().try_to_vec().unwrap()
    };
    for shards in [2, 3, 7] {
        let (l, g) = step(shards);
        assert!(
            (l - loss).abs() < 1e-5 * loss.abs(),
            "{shards} shards: loss {l} vs {loss}"
        );
        for (name, id) in params {
            let (a, b) = (values(&grads, id), values(&g, id));
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{name}: no gradient");
            let diff = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-4 * scale,
                "{shards} shards, {name}: differs by {diff} (scale {scale})"
            );
        }
    }
}
