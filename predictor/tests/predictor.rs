//! The predictor end to end on traces with a known rule: it must learn what the rule
//! makes predictable (and the baselines cannot), serve incrementally what it computes in
//! batch, and refuse inputs that do not fit. `training.rs` checks that training repeats.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_online_matches_batched, assert_unknown_id_matches_batched, eval_test_split, f1_of,
    options, rule_meta, rule_trace, E, LAYERS,
};

use datasets::examples::{ExampleSet, Split};
use datasets::{save_trace, Phase, TokenRecord, TraceBuilder, TraceFormat};
use predictor::device::BackendKind;
use predictor::{Features, LoadedPredictor, OnlinePredictor, Query, Task};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn learns_token_rule_the_baselines_miss() {
    let dir = tempfile::tempdir().unwrap();
    let trace = rule_trace(&dir.path().join("t.mctrace"), Task::NextToken, 40, 24, 0);
    let out = dir.path().join("nt");
    let s = predictor::train(&options(trace.clone(), Task::NextToken, out.clone(), 12)).unwrap();
    assert!(s.finished);
    let r = eval_test_split(&out, &trace);
    let (p, prev, freq) = (
        f1_of(&r, "predictor", 0),
        f1_of(&r, "previous-token", 0),
        f1_of(&r, "frequency", 0),
    );
    assert!(p > 0.9, "predictor F1 {p}");
    assert!(prev < 0.5 && freq < 0.5, "baselines {prev} {freq}");
    // Beside the baselines, each token id's first-layer experts are counted (read back
    // from the predictor's directory): only the rule's two, equally often, and every
    // training token once.
    let dev = BackendKind::from_test_env().device();
    let stats = LoadedPredictor::load(&out, &dev)
        .unwrap()
        .baselines
        .unwrap();
    assert!(stats.first_layer_by_token.len() > 20);
    for (&tok, row) in &stats.first_layer_by_token {
        let want = [(tok % E) as usize, ((tok + 3) % E) as usize];
        for (x, &c) in row.iter().enumerate() {
            assert_eq!(c > 0.0, want.contains(&x), "token {tok} expert {x}: {c}");
        }
        assert_eq!(row[want[0]], row[want[1]], "token {tok}");
    }
    let counted: f32 = stats.first_layer_by_token.values().flatten().sum();
    let layer0: f32 = stats.frequency[..E as usize].iter().sum();
    assert_eq!(counted, layer0);
    let o = r.method("predictor").unwrap().groups[0].overall;
    // top-k sets of equal size: precision = recall = F1.
    assert!((o.precision - o.recall).abs() < 1e-12 && (o.f1 - o.recall).abs() < 1e-12);
    let methods: Vec<&str> = r.methods.iter().map(|m| m.method.as_str()).collect();
    assert_eq!(
        methods,
        ["predictor", "previous-token", "frequency", "token table"],
        "next-token has no co-activation baselines"
    );
}

#[test]
fn lookahead_learns_the_layer_chain() {
    let dir = tempfile::tempdir().unwrap();
    let trace = rule_trace(&dir.path().join("t.mctrace"), Task::Lookahead, 40, 24, 1);
    let out = dir.path().join("la");
    predictor::train(&options(trace.clone(), Task::Lookahead, out.clone(), 12)).unwrap();
    let r = eval_test_split(&out, &trace);
    // A lookahead predictor also answers the next-token query it was trained on.
    assert_eq!(r.groups, ["next token", "+1 layer", "+2 layer", "+3 layer"]);
    let p = f1_of(&r, "predictor", 1);
    assert!(p > 0.9, "+1 layer F1 {p}");
    assert!(
        f1_of(&r, "co-activation", 1) > 0.9,
        "the rule is pure co-activation"
    );
    assert!(f1_of(&r, "frequency", 1) < 0.5);
    // Co-activation needs a known layer: it has no next-token figures.
    assert_eq!(r.method("co-activation").unwrap().groups[0].overall.sets, 0);
    assert!(r.method("predictor").unwrap().groups[0].overall.sets > 0);
    // +3 targets exist only for layer 3 (known = 1).
    let g3 = &r.method("predictor").unwrap().groups[3];
    assert!(g3.per_layer[..3].iter().all(Option::is_none) && g3.per_layer[3].is_some());
}

#[test]
fn online_predictions_equal_the_batched_forward() {
    let dir = tempfile::tempdir().unwrap();
    let trace = rule_trace(&dir.path().join("t.mctrace"), Task::Lookahead, 20, 12, 3);
    for task in [Task::NextToken, Task::Lookahead] {
        let out = dir.path().join(task.as_str());
        predictor::train(&options(trace.clone(), task, out.clone(), 1)).unwrap();
        let mut forecast = |online: &mut OnlinePredictor,
                            _: &datasets::TraceView<'_>,
                            t: usize,
                            token: u32,
                            layers: &[&[u16]],
                            q: Query| {
            match q.known {
                0 => online.predict_next(token),
                known => online.predict_lookahead(token, &layers[..known]),
            }
            .unwrap_or_else(|e| panic!("{task:?} token {t}: {e}"))
        };
        assert_online_matches_batched(&out, &trace, None, &|_| true, &mut forecast);
        // Tokens observed without a forecast are encoded at the next one: 3 one by one
        // (token 3), then, 11 pending, the window's 15 from scratch (token 15).
        assert_online_matches_batched(&out, &trace, None, &|t| t == 3 || t == 15, &mut forecast);
    }
}

#[test]
fn lazy_observation_equals_encoding_every_token_past_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let trace = rule_trace(&dir.path().join("t.mctrace"), Task::NextToken, 6, 40, 5);
    let dev = BackendKind::from_test_env().device();
    for context in [16, 4] {
        let out = dir.path().join(format!("c{context}"));
        let mut o = options(trace.clone(), Task::NextToken, out.clone(), 1);
        o.config = o.config.with_context(context);
        predictor::train(&o).unwrap();
        let set = ExampleSet::open(std::slice::from_ref(&trace), &o.split).unwrap();
        let view = set.view(0);
        let mut every = OnlinePredictor::new(LoadedPredictor::load(&out, &dev).unwrap());
        let mut lazy = OnlinePredictor::new(LoadedPredictor::load(&out, &dev).unwrap());
        let r = view.sequence_ranges()[0].clone();
        assert!(r.len() > 2 * context);
        for t in r {
            let token = view.token[t];
            let a = every.predict_next(token).unwrap();
            // Three tokens observed between forecasts: encoded one by one, exactly.
            if t % 4 == 3 {
                let b = lazy.predict_next(token).unwrap();
                for (x, y) in a.probs.iter().zip(&b.probs) {
                    assert!(
                        (x - y).abs() < 1e-5,
                        "context {context}, token {t}: {x} vs {y}"
                    );
                }
            }
            let layers: Vec<Option<&[u16]>> =
                (0..LAYERS as usize).map(|m| view.layer(t, m)).collect();
            every.observe(token, &layers).unwrap();
            lazy.observe(token, &layers).unwrap();
        }
    }
}

#[test]
fn bad_inputs_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let dev = BackendKind::from_test_env().device();
    let err = LoadedPredictor::load(dir.path(), &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("predictor.json"), "{err}");
    std::fs::write(dir.path().join("predictor.json"), "{ not json").unwrap();
    let err = LoadedPredictor::load(dir.path(), &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("predictor.json") && err.contains("malformed"),
        "{err}"
    );

    let trace = rule_trace(&dir.path().join("t.mctrace"), Task::NextToken, 20, 10, 4);
    let out = dir.path().join("p");
    let mut o = options(trace, Task::NextToken, out.clone(), 1);
    o.config.d_model = 30;
    o.config.n_heads = 4;
    let err = predictor::train(&o).err().unwrap().to_string();
    assert!(err.contains("--d-model"), "{err}");
    o.config.d_model = 32;
    predictor::train(&o).unwrap();
    let p = LoadedPredictor::load(&out, &dev).unwrap();
    let synth = datasets::synth::synthetic_trace(&datasets::synth::SynthConfig::default());
    let other = dir.path().join("other.mctrace");
    save_trace(&synth, &other, Some(TraceFormat::Binary)).unwrap();
    let err = ExampleSet::open_for_test(&[other], Some(p.card.config.routing))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("other.mctrace") && err.contains("does not match"),
        "{err}"
    );
    let mut online = OnlinePredictor::new(p);
    let err = online.observe(1, &[None]).err().unwrap().to_string();
    assert!(err.contains("layers"), "{err}");
    assert!(
        online.predict_lookahead(1, &[&[0, 1]]).is_err(),
        "next-token predictor"
    );
}

const DIM: usize = 8;

/// Hidden-state rule: every layer's experts are random, and layer `m`'s router input is
/// a one-hot of layer `m + 1`'s first expert (plus noise): only the router input tells
/// what comes next.
fn hidden_rule_trace(path: &Path, seqs: usize, len: usize, seed: u64) -> PathBuf {
    let mut b = TraceBuilder::new(rule_meta("hidden-rule", Some(DIM as u32)), false).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for s in 0..seqs {
        for pos in 0..len {
            let firsts: Vec<u32> = (0..LAYERS).map(|_| rng.random_range(0..E)).collect();
            let mut layers = Vec::new();
            let mut inputs = Vec::new();
            for m in 0..LAYERS as usize {
                let mut set = vec![firsts[m], (firsts[m] + 3) % E];
                set.sort();
                layers.push(Some(set));
                let mut x: Vec<f32> = (0..DIM).map(|_| rng.random_range(-0.1..0.1)).collect();
                if let Some(&next) = firsts.get(m + 1) {
                    x[next as usize] += 1.0;
                }
                inputs.push(Some(x));
            }
            b.push(&TokenRecord {
                seq: format!("s{s}"),
                pos: pos as u32,
                phase: Phase::Decode,
                token: Some(rng.random_range(0..40)),
                experts: layers,
                weights: None,
                channels: [("router_inputs".to_string(), inputs)].into(),
            })
            .unwrap();
        }
    }
    save_trace(&b.finish().unwrap(), path, Some(TraceFormat::Binary)).unwrap();
    path.to_path_buf()
}

#[test]
fn hidden_features_learn_what_expert_ids_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let trace = hidden_rule_trace(&dir.path().join("h.mctrace"), 40, 24, 4);
    let mut f1 = Vec::new();
    for features in [Features::Ids, Features::Hidden] {
        let out = dir.path().join(features.as_str());
        let mut o = options(trace.clone(), Task::Lookahead, out.clone(), 10);
        o.config = o
            .config
            .with_features(features)
            .with_router_input_dim(DIM)
            .with_token_dropout(0.2);
        predictor::train(&o).unwrap();
        let r = eval_test_split(&out, &trace);
        f1.push((f1_of(&r, "predictor", 1), f1_of(&r, "predictor", 2)));
    }
    let ((ids1, _), (hid1, hid2)) = (f1[0], f1[1]);
    assert!(hid1 > 0.9, "hidden +1 layer F1 {hid1}");
    assert!(ids1 < 0.5, "ids cannot know the next layer: {ids1}");
    assert!(hid2 < 0.5, "+2 layers is not in the input: {hid2}");

    // Online forecasts with router inputs equal the batched forward.
    let out = dir.path().join(Features::Hidden.as_str());
    assert_online_matches_batched(
        &out,
        &trace,
        Some(DIM),
        &|_| true,
        |online, view, t, token, layers, q| {
            if q.known == 0 {
                return online.predict_next(token).unwrap();
            }
            let known = &layers[..q.known];
            assert!(
                online.predict_lookahead(token, known).is_err(),
                "input required"
            );
            let x = view.router_input_f32(t, q.known - 1).unwrap();
            online
                .predict_lookahead_with_input(token, known, Some(&x))
                .unwrap()
        },
    );
    // Trained with token-id dropout, the forecast before the id equals the batched
    // forward with that position's id hidden.
    assert_unknown_id_matches_batched(&out, &trace);
    // A trace without router inputs is refused by name.
    let plain = rule_trace(
        &dir.path().join("plain.mctrace"),
        Task::Lookahead,
        10,
        12,
        5,
    );
    let mut o = options(plain, Task::Lookahead, dir.path().join("x"), 1);
    o.config = o
        .config
        .with_features(Features::Hidden)
        .with_router_input_dim(DIM);
    let err = predictor::train(&o).unwrap_err().to_string();
    assert!(
        err.contains("plain.mctrace") && err.contains("--hidden-states"),
        "{err}"
    );
    // A router-input map of width 0 is refused by its option's name.
    let mut o = options(trace, Task::Lookahead, dir.path().join("w0"), 1);
    o.config = o
        .config
        .with_features(Features::Hidden)
        .with_router_input_dim(DIM)
        .with_hidden_width(0);
    let err = predictor::train(&o).unwrap_err().to_string();
    assert!(err.contains("--hidden-width"), "{err}");
}

/// Chain rule across tokens: token `t + 1`'s first expert at layer 0 is token `t`'s plus
/// 5 (mod E) 80% of the time (else random), and its id always tells it (`id mod E`): a
/// predictor that always sees ids leans on them (about 0.55 top-2 recall with the
/// unknown row), one trained to do without them reads the chain from the routing before
/// the id is sampled (about 0.85 is possible).
fn chain_trace(path: &Path, seqs: usize, len: usize, seed: u64) -> PathBuf {
    let mut b = TraceBuilder::new(rule_meta("chain", None), false).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for s in 0..seqs {
        let mut first = rng.random_range(0..E);
        for pos in 0..len {
            let layers = (0..LAYERS)
                .map(|m| {
                    let f = (first + m) % E;
                    let mut set = vec![f, (f + 3) % E];
                    set.sort();
                    Some(set)
                })
                .collect();
            b.push(&TokenRecord {
                channels: Default::default(),
                seq: format!("s{s}"),
                pos: pos as u32,
                phase: Phase::Decode,
                token: Some(first + E * rng.random_range(0..5)),
                experts: layers,
                weights: None,
            })
            .unwrap();
            first = if rng.random_bool(0.8) {
                (first + 5) % E
            } else {
                rng.random_range(0..E)
            };
        }
    }
    save_trace(&b.finish().unwrap(), path, Some(TraceFormat::Binary)).unwrap();
    path.to_path_buf()
}

#[test]
fn token_dropout_forecasts_the_next_token_before_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let trace = chain_trace(&dir.path().join("c.mctrace"), 40, 16, 6);
    let dev = BackendKind::from_test_env().device();

    // Without token-id dropout the unknown row is untrained: refused by name.
    let plain = dir.path().join("plain");
    predictor::train(&options(trace.clone(), Task::NextToken, plain.clone(), 1)).unwrap();
    let mut online = OnlinePredictor::new(LoadedPredictor::load(&plain, &dev).unwrap());
    let err = online.predict_next_unknown().unwrap_err().to_string();
    assert!(err.contains("--token-dropout"), "{err}");
    let mut o = options(trace.clone(), Task::NextToken, dir.path().join("bad"), 1);
    o.config = o.config.with_token_dropout(1.0);
    let err = predictor::train(&o).unwrap_err().to_string();
    assert!(err.contains("--token-dropout"), "{err}");

    let out = dir.path().join("dropout");
    let mut o = options(trace.clone(), Task::NextToken, out.clone(), 10);
    o.config = o.config.with_token_dropout(0.3);
    predictor::train(&o).unwrap();
    let p = LoadedPredictor::load(&out, &dev).unwrap();
    let set = ExampleSet::open(std::slice::from_ref(&trace), &p.card.split).unwrap();
    let view = set.view(0);
    let mut peeking = OnlinePredictor::new(p);
    let mut plain = OnlinePredictor::new(LoadedPredictor::load(&out, &dev).unwrap());
    let (mut found, mut total) = (0, 0);
    for s in set.split(Split::Test) {
        peeking.reset();
        plain.reset();
        for t in s.tokens.clone() {
            let layers: Vec<&[u16]> = (0..LAYERS as usize)
                .map(|m| view.layer(t, m).unwrap())
                .collect();
            if t > s.tokens.start {
                // The forecast before the id names the chain's next experts ...
                let f = peeking.predict_next_unknown().unwrap();
                for (l, truth) in layers.iter().enumerate() {
                    found += f.top(l, 2).iter().filter(|x| truth.contains(x)).count();
                    total += 2;
                }
            }
            // ... and leaves nothing behind: the forecast with the id is unchanged.
            let a = peeking.predict_next(view.token[t]).unwrap();
            let b = plain.predict_next(view.token[t]).unwrap();
            assert_eq!(a, b, "token {t}");
            let routing: Vec<Option<&[u16]>> = layers.iter().map(|l| Some(*l)).collect();
            peeking.observe(view.token[t], &routing).unwrap();
            plain.observe(view.token[t], &routing).unwrap();
        }
    }
    let recall = found as f64 / total as f64;
    assert!(recall > 0.75, "recall before the id {recall}");

    // `eval` scores the same forecasts as a group of their own, beside the baselines
    // that never read the id.
    let mut report = eval_test_split(&out, &trace);
    let mut online = OnlinePredictor::new(LoadedPredictor::load(&out, &dev).unwrap());
    predictor::eval::score_before_id(&mut report, &mut online, &set, Split::Test, &[]).unwrap();
    let g = report.groups.len() - 1;
    assert_eq!(report.groups[g], predictor::eval::BEFORE_ID_GROUP);
    let f1 = f1_of(&report, "predictor", g);
    assert!((f1 - recall).abs() < 1e-9, "eval {f1} vs by hand {recall}");
    assert!(f1_of(&report, "previous-token", g) < 0.5);
}
