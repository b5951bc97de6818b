//! The trace-driven simulator against direct computations: its LRU against the trace's
//! statistics, the oracle's horizon, honest prefetch timing, and the prefetch plans.

use datasets::stats;
use datasets::synth::{synthetic_trace, SynthConfig};
use offload::prefetch;
use offload::simulate::{simulate, PrefetchPlan, SimConfig};

fn one_sequence_trace() -> datasets::RoutingTrace {
    synthetic_trace(&SynthConfig {
        n_layers: 4,
        n_experts: 16,
        top_k: 2,
        sequences: 1,
        tokens_per_sequence: 400,
        stickiness: 0.5,
        ..SynthConfig::default()
    })
}

fn config(capacity: usize, per_layer: bool, policy: &str, untimed: bool) -> SimConfig {
    SimConfig {
        capacity,
        per_layer,
        policy: policy.into(),
        bandwidth_gbps: 10.0,
        expert_bytes: 1e4,
        compute_us_per_layer: 5.0,
        attention_us_per_layer: 0.0,
        untimed,
        deadline_order: false,
        chunk_bytes: 0.0,
        planned: false,
    }
}

#[test]
fn simulated_lru_matches_the_trace_statistics() {
    let trace = one_sequence_trace();
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let s = stats::compute(&view, &[2, 4, 8]);
    let plan = PrefetchPlan::empty("none", view.n_tokens(), 4);
    for (i, per_layer_cap) in [2usize, 4, 8].into_iter().enumerate() {
        let r = simulate(
            &view,
            &seqs,
            &plan,
            &config(per_layer_cap * 4, true, "lru", false),
        )
        .unwrap();
        assert!(
            (r.hit_rate() - s.lru_hit_rate[i]).abs() < 1e-9,
            "capacity {per_layer_cap}: {} vs {}",
            r.hit_rate(),
            s.lru_hit_rate[i]
        );
        assert_eq!(r.hits + r.late + r.misses, r.accesses);
        assert_eq!(r.late, 0, "no prefetches, nothing in flight when needed");
        // Every miss is a demand transfer of 1 us; a layer waits for its misses in turn
        // (the link is idle when a layer starts: 5 us of compute per layer).
        assert!((r.bytes_demand - r.misses as f64 * 1e4).abs() < 1e-6);
        assert!(
            (r.stall_us - r.misses as f64).abs() < 1e-6,
            "{} vs {}",
            r.stall_us,
            r.misses
        );
    }
}

/// The oracle reads `horizon` layers ahead: a layer's experts are issued once the layer
/// `horizon` positions earlier in the sequence (counting across tokens) has routed, or
/// at the sequence's start; on a link slower than a layer's compute the longer lead
/// stalls less.
#[test]
fn the_oracle_reads_its_horizon_ahead() {
    let trace = one_sequence_trace();
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let (m, e, start) = (4, 16, seqs[0].start);
    for horizon in [1, 2, 4] {
        let plan = prefetch::oracle(&view, &seqs, horizon);
        for t in seqs[0].clone() {
            for l in 0..m {
                let g = (t - start) * m + l;
                let (at, slot) = match g.checked_sub(horizon) {
                    None => (start, 0),
                    Some(p) => (start + p / m, p % m + 1),
                };
                for &x in view.layer(t, l).unwrap() {
                    let id = (l * e + x as usize) as u32;
                    assert!(
                        plan.at(at, slot).contains(&id),
                        "horizon {horizon}: token {t} layer {l} expert {x} not at ({at}, {slot})"
                    );
                }
            }
        }
        let issued: usize = (0..view.n_tokens())
            .flat_map(|t| (0..=m).map(move |s| (t, s)))
            .map(|(t, s)| plan.at(t, s).len())
            .sum();
        assert_eq!(issued, view.n_tokens() * m * 2, "horizon {horizon}");
    }
    let mut slow = config(16, false, "next-use", false);
    slow.bandwidth_gbps = 0.5;
    let stall = |h| {
        simulate(&view, &seqs, &prefetch::oracle(&view, &seqs, h), &slow)
            .unwrap()
            .stall_us
    };
    assert!(stall(3) < stall(1), "{} vs {}", stall(3), stall(1));
}

#[test]
fn prefetch_timing_is_honest() {
    let trace = one_sequence_trace();
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let oracle = prefetch::oracle(&view, &seqs, 1);
    // Untimed, the oracle's experts are in place at every lookup.
    let u = simulate(&view, &seqs, &oracle, &config(16, false, "lru", true)).unwrap();
    assert_eq!(u.hits, u.accesses, "{u:?}");
    // Timed, one layer of compute (5 us) covers every transfer but those of the
    // sequence's first token's layer 0, issued at its start with no lead: late.
    let t = simulate(&view, &seqs, &oracle, &config(16, false, "lru", false)).unwrap();
    assert_eq!((t.late, t.misses), (2, 0), "{t:?}");
    // Per layer: the outcomes add up, and only layer 0 is late.
    assert_eq!(t.per_layer.len(), 4);
    let sum = |f: fn(&offload::simulate::LayerOutcomes) -> u64| -> u64 {
        t.per_layer.iter().map(f).sum()
    };
    assert_eq!(
        (sum(|l| l.hits), sum(|l| l.late), sum(|l| l.misses)),
        (t.hits, t.late, t.misses)
    );
    assert!(t.per_layer[0].late > 0 && t.per_layer[1..].iter().all(|l| l.late == 0));
    assert!(t.hit_rate() > 0.7, "{}", t.hit_rate());
    // A slow link (transfer 10x a layer's compute) leaves the one-layer oracle late.
    let mut slow = config(16, false, "lru", false);
    slow.bandwidth_gbps = 0.2;
    let s = simulate(&view, &seqs, &oracle, &slow).unwrap();
    assert!(
        s.hit_rate() < t.hit_rate() && s.late > t.late && s.stall_us > t.stall_us,
        "slow {s:?}\nfast {t:?}"
    );
    // Demand paging: OPT bounds LRU and LFU.
    let none = PrefetchPlan::empty("none", view.n_tokens(), 4);
    let opt = simulate(&view, &seqs, &none, &config(8, false, "belady", false)).unwrap();
    let lru = simulate(&view, &seqs, &none, &config(8, false, "lru", false)).unwrap();
    let lfu = simulate(&view, &seqs, &none, &config(8, false, "lfu", false)).unwrap();
    assert!(opt.hits >= lru.hits && opt.hits >= lfu.hits);
    assert!(opt.tokens_per_s() >= lru.tokens_per_s());
    let err = simulate(&view, &seqs, &none, &config(0, false, "lru", false)).unwrap_err();
    assert!(err.contains("capacity"), "{err}");
}

/// The plan ids (`layer * n_experts + expert`) of token `t`'s true experts at layer `l`.
fn true_ids(view: &datasets::TraceView<'_>, t: usize, l: usize) -> Vec<u32> {
    let e = view.meta.n_experts as usize;
    let ids = view.layer(t, l).expect("every layer computed");
    ids.iter().map(|&x| (l * e + x as usize) as u32).collect()
}

#[test]
fn prefetches_before_attention_land_while_attention_runs() {
    let trace = one_sequence_trace();
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let m = view.meta.n_moe();
    // Each layer's true experts, issued at the layer's start (an exact pre-attention gate).
    let mut exact = PrefetchPlan::empty("exact", view.n_tokens(), m);
    for t in 0..view.n_tokens() {
        for l in 0..m {
            exact
                .before_attention_mut(t, l)
                .extend(true_ids(&view, t, l));
        }
    }
    // Transfers take 1 us each (k per layer): without attention time every expert not
    // already resident is late (none is missed), with attention covering them every
    // lookup hits.
    let k = view.meta.top_k as f64;
    let no_attention = simulate(&view, &seqs, &exact, &config(16, false, "lru", false)).unwrap();
    assert_eq!(no_attention.misses, 0, "{no_attention:?}");
    assert!(no_attention.late > 0 && no_attention.late == no_attention.prefetches);
    let mut cfg = config(16, false, "lru", false);
    cfg.attention_us_per_layer = k;
    let covered = simulate(&view, &seqs, &exact, &cfg).unwrap();
    assert_eq!(covered.hits, covered.accesses, "{covered:?}");
    assert_eq!(covered.stall_us, 0.0);
    // Attention time counts as compute; with no prefetch it changes nothing else.
    let none = PrefetchPlan::empty("none", view.n_tokens(), m);
    let plain = simulate(&view, &seqs, &none, &config(16, false, "lru", false)).unwrap();
    let with_attention = simulate(&view, &seqs, &none, &cfg).unwrap();
    assert_eq!(
        (with_attention.hits, with_attention.misses),
        (plain.hits, plain.misses)
    );
    let layers = (view.n_tokens() * m) as f64;
    assert!((with_attention.compute_us - plain.compute_us - k * layers).abs() < 1e-6);

    // A union issues both plans' experts, each once.
    let oracle = prefetch::oracle(&view, &seqs, 1);
    let both = PrefetchPlan::union(&[&oracle, &exact, &oracle]);
    assert_eq!(both.name, "oracle+exact+oracle");
    assert_eq!(both.events, oracle.events);
    assert_eq!(both.before_attention, exact.before_attention);
    let r = simulate(&view, &seqs, &both, &cfg).unwrap();
    assert_eq!(r.hits, r.accesses);
}

#[test]
fn deadline_order_sends_the_nearest_layer_first() {
    let trace = one_sequence_trace();
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let m = view.meta.n_moe();
    // At each token's start, the true experts of layers m-1, ..., 1: farthest first.
    let mut reversed = PrefetchPlan::empty("reversed", view.n_tokens(), m);
    for t in 0..view.n_tokens() {
        for l in (1..m).rev() {
            reversed.at_mut(t, 0).extend(true_ids(&view, t, l));
        }
    }
    let mut issue = config(16, false, "lru", false);
    issue.compute_us_per_layer = 3.0;
    let deadline = SimConfig {
        deadline_order: true,
        ..issue.clone()
    };
    // Issue order: layer 1's experts wait behind the later layers' (up to 6 us of 1 us
    // transfers, and layer 0's demand fetches; 3 us of compute per layer): late.
    // Deadline order: sent first, in place.
    let fifo = simulate(&view, &seqs, &reversed, &issue).unwrap();
    let edf = simulate(&view, &seqs, &reversed, &deadline).unwrap();
    assert!(fifo.late > 0, "{fifo:?}");
    assert!(
        edf.late < fifo.late && edf.hits > fifo.hits,
        "{edf:?}\n{fifo:?}"
    );
    assert!(edf.stall_us < fifo.stall_us);
    assert_eq!(
        (edf.prefetches, edf.bytes_prefetch),
        (fifo.prefetches, fifo.bytes_prefetch)
    );
    // A plan that already issues nearest-first is simulated identically in both orders.
    let oracle = prefetch::oracle(&view, &seqs, 1);
    assert_eq!(
        simulate(&view, &seqs, &oracle, &issue).unwrap(),
        simulate(&view, &seqs, &oracle, &deadline).unwrap()
    );
}

#[test]
fn learned_plan_forecasts_the_next_token_before_its_id_only_when_trained_to() {
    use datasets::examples::{RoutingShape, SplitConfig};
    use predictor::device::BackendKind;
    use predictor::{LoadedPredictor, OnlinePredictor, PredictorConfig, Task, TrainOptions};
    let dir = tempfile::tempdir().unwrap();
    let trace = synthetic_trace(&SynthConfig {
        n_layers: 4,
        n_experts: 16,
        top_k: 2,
        sequences: 3,
        tokens_per_sequence: 24,
        ..SynthConfig::default()
    });
    let path = dir.path().join("t.mctrace");
    datasets::save_trace(&trace, &path, Some(datasets::TraceFormat::Binary)).unwrap();
    let view = trace.view();
    let seqs = view.sequence_ranges();
    for token_dropout in [0.0, 0.2] {
        let out = dir.path().join(format!("p{token_dropout}"));
        let shape = RoutingShape::of(view.meta);
        let config = PredictorConfig::new(shape, Task::Lookahead)
            .with_d_model(16)
            .with_n_layers(1)
            .with_n_heads(2)
            .with_context(16)
            .with_token_buckets(64)
            .with_token_dropout(token_dropout);
        predictor::train(&TrainOptions {
            traces: vec![path.clone()],
            config,
            split: SplitConfig {
                validation: 0.3,
                test: 0.0,
                seed: 0,
            },
            settings: predictor::TrainSettings {
                max_epochs: 1,
                shards: 2,
                ..Default::default()
            },
            backend: BackendKind::from_test_env(),
            out: out.clone(),
            progress: false,
            run_steps: None,
        })
        .unwrap();
        let dev = BackendKind::from_test_env().device();
        let mut online = OnlinePredictor::new(LoadedPredictor::load(&out, &dev).unwrap());
        let plan = prefetch::learned(&view, &seqs, &mut online, 3, 1).unwrap();
        for r in &seqs {
            for t in r.clone() {
                // After the last layer: the next token's layer 0, never past the sequence.
                let after = plan.at(t, 4);
                let want = if token_dropout > 0.0 && t + 1 < r.end {
                    3
                } else {
                    0
                };
                assert_eq!(after.len(), want, "token {t}: {after:?}");
                assert!(after.iter().all(|&id| (id as usize) < 16), "layer 0 only");
                // Horizon 1: after layer l, only layer l + 1.
                for slot in 1..4 {
                    let ids = plan.at(t, slot);
                    assert!(ids.len() == 3 && ids.iter().all(|&id| id as usize / 16 == slot));
                }
            }
        }
    }
}

#[test]
fn token_prefetch_asks_each_layer_horizon_layers_ahead_from_the_token_table() {
    let trace = datasets::synth::token_routed_trace(
        &SynthConfig {
            n_layers: 4,
            n_experts: 16,
            top_k: 2,
            sequences: 6,
            tokens_per_sequence: 40,
            seed: 9,
            ..SynthConfig::default()
        },
        20,
    );
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let mut stats = predictor::baselines::BaselineStats::new(
        datasets::examples::RoutingShape::of(view.meta),
        1,
    );
    for r in &seqs {
        stats.add_tokens(&view, r.clone());
    }
    let horizon = 2;
    let plan = prefetch::token(&view, &seqs, &stats, 2, horizon);
    let mut ranking = Vec::new();
    for t in 0..view.n_tokens() {
        let mut want: Vec<Vec<u32>> = vec![Vec::new(); m + 1];
        for l in 0..m {
            stats.rank_token(l, Some(view.token[t]), 2, &mut ranking);
            // Layers 0..horizon at the token's start, layer l after layer l - horizon.
            let slot = (l + 1).saturating_sub(horizon);
            want[slot].extend(ranking.iter().map(|&x| (l * e + x as usize) as u32));
        }
        for (slot, w) in want.iter().enumerate() {
            assert_eq!(plan.at(t, slot), &w[..], "token {t} slot {slot}");
        }
    }
    // The id fixes one of each layer's two experts: the table's prefetches hit where
    // demand paging alone cannot.
    let none = PrefetchPlan::empty("none", view.n_tokens(), m);
    let cfg = config(16, false, "lru", false);
    let plain = simulate(&view, &seqs, &none, &cfg).unwrap();
    let token = simulate(&view, &seqs, &plan, &cfg).unwrap();
    assert!(
        token.hits > plain.hits + plain.accesses / 5,
        "{token:?} vs {plain:?}"
    );
}

/// `moecast simulate`'s oracle row is the fastest of its leads, one to `--horizon`
/// layers ahead (a long lead can crowd a small cache, a short one arrive late).
#[test]
fn the_study_reports_the_oracle_at_its_fastest_lead() {
    use offload::simulate::study::{run_study, StudySettings};
    let trace = one_sequence_trace();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.mctrace");
    datasets::binary::write_binary(&trace, &path).unwrap();
    let settings = StudySettings {
        trace: path.clone(),
        parts: vec![path],
        cache: vec!["10%".into(), "50%".into()],
        sweep: false,
        policy: vec!["lru".into(), "next-use".into()],
        prefetch: vec!["oracle".into()],
        predictor: None,
        model: None,
        budget: vec!["2".into()],
        chunk_bytes: 1048576.0,
        horizon: 3,
        per_layer: false,
        bandwidth: 0.5,
        expert_bytes: Some(1e4),
        compute_us_per_layer: 5.0,
        attention_us_per_layer: 0.0,
        deadline_order: true,
    };
    let study = run_study(&settings, |_, _| {}).unwrap();
    assert_eq!(study.rows.len(), 4);
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let mut shorter_wins = false;
    for row in &study.rows {
        let r = &row.timed;
        let mut config = config(r.capacity, false, &r.policy, false);
        config.bandwidth_gbps = 0.5;
        config.deadline_order = true;
        let by_lead: Vec<f64> = (1..=3)
            .map(|h| {
                simulate(&view, &seqs, &prefetch::oracle(&view, &seqs, h), &config)
                    .unwrap()
                    .tokens_per_s()
            })
            .collect();
        let fastest = by_lead.iter().copied().fold(0.0, f64::max);
        assert_eq!(
            r.tokens_per_s(),
            fastest,
            "{} {}: {by_lead:?}",
            row.cache,
            r.policy
        );
        shorter_wins |= by_lead[2] < fastest;
    }
    // Somewhere a lead shorter than the horizon is the fastest: the choice matters.
    assert!(shorter_wins, "the longest lead was always fastest");
}
