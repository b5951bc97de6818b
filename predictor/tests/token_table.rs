//! The token table (per token id and layer, expert counts of the training split) as a
//! baseline and as the predictor's prior: it counts what a direct count gives, survives
//! save/load, backs off for unseen ids, and the predictor that contains it never falls
//! below it and beats it where the previous token's routing adds information.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::eval_test_split;
use datasets::examples::{ExampleSet, RoutingShape, Split, SplitConfig};
use datasets::synth::{token_routed_trace, SynthConfig};
use datasets::{save_trace, TraceFormat};
use predictor::baselines::BaselineStats;
use predictor::device::BackendKind;
use predictor::{evaluate, EvalOptions, LoadedPredictor, PredictorConfig, Task, TrainOptions};

fn synth(sequences: usize, len: usize, vocab: u32, seed: u64) -> datasets::RoutingTrace {
    token_routed_trace(
        &SynthConfig {
            n_layers: 4,
            n_experts: 16,
            top_k: 2,
            sequences,
            tokens_per_sequence: len,
            seed,
            ..SynthConfig::default()
        },
        vocab,
    )
}

fn saved(trace: &datasets::RoutingTrace, path: &Path) -> PathBuf {
    save_trace(trace, path, Some(TraceFormat::Binary)).unwrap();
    path.to_path_buf()
}

#[test]
fn token_table_is_a_direct_count_ranked_as_documented() {
    let trace = synth(6, 50, 30, 3);
    let view = trace.view();
    let n = view.n_tokens();
    let shape = RoutingShape::of(view.meta);
    let mut stats = BaselineStats::new(shape, 1);
    stats.add_tokens(&view, 0..n);
    // A direct count per (id, layer, expert), and per (layer, expert).
    let mut direct: BTreeMap<(u32, usize), Vec<f32>> = BTreeMap::new();
    let mut layer_counts = vec![vec![0f32; 16]; 4];
    for t in 0..n {
        for (l, counts) in layer_counts.iter_mut().enumerate() {
            for &x in view.layer(t, l).unwrap() {
                direct
                    .entry((view.token[t], l))
                    .or_insert_with(|| vec![0.0; 16])[x as usize] += 1.0;
                counts[x as usize] += 1.0;
            }
        }
    }
    let table = stats.token_table.as_ref().unwrap();
    assert_eq!(
        table.rows.len(),
        direct
            .keys()
            .map(|k| k.0)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );
    let mut ranking = Vec::new();
    for ((id, l), counts) in &direct {
        let row = table.rows.get(id).unwrap();
        let mut got = vec![0f32; 16];
        for x in row.layer(*l) {
            got[x.expert as usize] = x.count;
        }
        assert_eq!(&got, counts, "token {id} layer {l}");
        // Ranked by count, then the layer's frequency, then the lower expert id.
        let mut want: Vec<u16> = (0..16).collect();
        want.sort_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            counts[b]
                .total_cmp(&counts[a])
                .then(layer_counts[*l][b].total_cmp(&layer_counts[*l][a]))
                .then(a.cmp(&b))
        });
        stats.rank_token(*l, Some(*id), 5, &mut ranking);
        assert_eq!(ranking, want[..5], "token {id} layer {l}");
    }
    // An id never seen, and an unknown one, fall back to the layer's frequency order.
    let mut freq = Vec::new();
    for l in 0..4 {
        stats.rank_frequency(l, 6, &mut freq);
        for id in [Some(1_000_000), None] {
            stats.rank_token(l, id, 6, &mut ranking);
            assert_eq!(ranking, freq, "layer {l}");
        }
    }
}

#[test]
fn sparse_token_table_survives_save_and_load_and_bad_files_name_themselves() {
    let trace = synth(4, 40, 25, 5);
    let view = trace.view();
    let shape = RoutingShape::of(view.meta);
    let mut stats = BaselineStats::new(shape, 2);
    stats.add_tokens(&view, 0..view.n_tokens());
    let path = Path::new("baselines.safetensors");
    let bytes = stats.to_safetensors().unwrap();
    let back = BaselineStats::from_safetensors(&bytes, shape, path).unwrap();
    assert_eq!(back, stats);
    // Sparse: one entry per (id, layer, expert) ever chosen, far below ids x layers x E.
    let table = back.token_table.as_ref().unwrap();
    assert!(table.n_entries() < table.rows.len() * 4 * 16 / 2);
    // A table whose entries point outside the model, or a cut file, is refused, naming
    // the file.
    let mut outside = stats.clone();
    for row in outside.token_table.as_mut().unwrap().rows.values_mut() {
        row.entries.iter_mut().for_each(|x| x.expert = 40);
    }
    let outside = outside.to_safetensors().unwrap();
    for bytes in [&outside[..], &bytes[..bytes.len() / 2]] {
        let err = BaselineStats::from_safetensors(bytes, shape, path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("baselines.safetensors"), "{err}");
    }
}

fn train_options(trace: PathBuf, out: PathBuf, config: PredictorConfig) -> TrainOptions {
    TrainOptions {
        traces: vec![trace],
        config,
        split: SplitConfig {
            validation: 0.15,
            test: 0.2,
            seed: 2,
        },
        settings: Default::default(),
        backend: BackendKind::from_test_env(),
        out,
        progress: false,
        run_steps: None,
    }
}

fn f1(r: &predictor::EvalReport, method: &str) -> f64 {
    r.method(method).unwrap().groups[0].overall.f1
}

#[test]
fn predictor_beats_the_table_where_the_previous_routing_adds_information() {
    let dir = tempfile::tempdir().unwrap();
    let trace = saved(&synth(40, 60, 30, 11), &dir.path().join("t.mctrace"));
    let shape = RoutingShape {
        n_moe: 4,
        n_experts: 16,
        top_k: 2,
    };
    let config = PredictorConfig::new(shape, Task::NextToken)
        .with_d_model(48)
        .with_n_layers(1)
        .with_n_heads(2)
        .with_context(32);
    let mut opts = train_options(trace.clone(), dir.path().join("p"), config);
    opts.settings.batch_size = 8;
    opts.settings.max_epochs = 25;
    opts.settings.warmup_steps = 20;
    let s = predictor::train(&opts).unwrap();
    assert!(s.finished);
    let r = eval_test_split(&opts.out, &trace);
    let (p, table, prev) = (
        f1(&r, "predictor"),
        f1(&r, "token table"),
        f1(&r, "previous-token"),
    );
    assert!(p > table + 0.1, "predictor {p} vs token table {table}");
    // The predictor's probabilities come with their reliability curve: every
    // (token, layer, expert) decision in one bin, the error a weighted mean gap.
    let g = &r.method("predictor").unwrap().groups[0];
    let c = g
        .calibration
        .as_ref()
        .expect("calibration of the predictor");
    let decisions: u64 = c.bins.iter().map(|b| b.count).sum();
    assert_eq!(decisions, g.overall.sets * 16);
    let ece: f64 = c
        .bins
        .iter()
        .map(|b| b.count as f64 / decisions as f64 * (b.frequency - b.mean_prob).abs())
        .sum();
    assert!((ece - c.ece).abs() < 1e-9 && c.ece < 0.5, "{c:?}");
    assert!(r.method("token table").unwrap().groups[0]
        .calibration
        .is_none());
    assert!(table > prev, "token table {table} vs previous-token {prev}");
    // Without training, the predictor is the table: its step-0 candidate was recorded.
    let card = LoadedPredictor::load(&opts.out, &BackendKind::from_test_env().device())
        .unwrap()
        .card;
    let use_ = card.token_ids.unwrap();
    assert_eq!((use_.seen, use_.sharing_a_row), (30, 0), "{use_:?}");
}

#[test]
fn default_training_on_a_small_trace_is_never_below_the_count_baselines() {
    let dir = tempfile::tempdir().unwrap();
    // About 3,000 tokens; 200 ids, most seen a handful of times.
    let trace = saved(&synth(30, 100, 200, 21), &dir.path().join("small.mctrace"));
    let shape = RoutingShape {
        n_moe: 4,
        n_experts: 16,
        top_k: 2,
    };
    let opts = train_options(
        trace.clone(),
        dir.path().join("p"),
        PredictorConfig::new(shape, Task::NextToken),
    );
    let s = predictor::train(&opts).unwrap();
    assert!(s.finished);
    let r = eval_test_split(&opts.out, &trace);
    let p = f1(&r, "predictor");
    for baseline in ["token table", "frequency", "previous-token"] {
        let b = f1(&r, baseline);
        assert!(p >= b - 0.005, "predictor {p} vs {baseline} {b}");
    }
}

#[test]
fn the_untrained_predictor_ranks_as_the_count_baselines() {
    let dir = tempfile::tempdir().unwrap();
    let trace = saved(&synth(12, 40, 40, 8), &dir.path().join("t.mctrace"));
    let set = ExampleSet::open(&[trace], &SplitConfig::default()).unwrap();
    let shape = set.shape();
    let mut stats = BaselineStats::new(shape, 2);
    for s in set.split(Split::Train) {
        stats.add_tokens(&set.view(s.trace), s.tokens.clone());
    }
    let dev = BackendKind::from_test_env().device();
    let config = PredictorConfig::new(shape, Task::Lookahead)
        .with_horizon(2)
        .with_d_model(32)
        .with_n_layers(1)
        .with_n_heads(2)
        .with_token_buckets(64);
    let model = predictor::ExpertPredictor::new(&config, &dev, 0);
    let r = evaluate(
        &model,
        Some(&stats),
        &set,
        Split::Validation,
        &dev,
        &EvalOptions::default(),
    )
    .unwrap();
    let pred = r.method("predictor").unwrap();
    let by = |name: &str, g: usize| r.method(name).unwrap().groups[g].overall;
    // Next token: the token table, set for set; lookahead: token + co-activation.
    assert_eq!(pred.groups[0].overall, by("token table", 0));
    for g in 1..r.groups.len() {
        assert_eq!(
            pred.groups[g].overall,
            by("token + co-activation", g),
            "{}",
            r.groups[g]
        );
    }
}
