//! The prefetch planner in the simulator: it never delays a demand read by more than the
//! chunk on the link, and planned prefetch is not slower than fetching on demand, over
//! random traces, forecasts and timings.

use datasets::synth::{synthetic_trace, SynthConfig};
use datasets::TraceView;
use offload::planner::{Candidate, LinkState, PlannerSettings, PrefetchPlanner, Verdict};
use offload::simulate::{simulate, PrefetchPlan, SimConfig, SimReport};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A forecaster of known quality: after each layer (and, for layer 0, after the previous
/// token's last layer) it offers the experts of the next `horizon` layers: each true
/// expert with probability `recall`, plus `wrong` random others, every one claimed at
/// probability `claimed` (a miscalibrated forecaster the planner must see through).
fn noisy_plan(
    view: &TraceView<'_>,
    recall: f64,
    wrong: usize,
    claimed: f32,
    horizon: usize,
    seed: u64,
) -> PrefetchPlan {
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut plan = PrefetchPlan::empty("noisy", view.n_tokens(), m);
    for r in view.sequence_ranges() {
        for t in r.clone() {
            for slot in 0..=m {
                // Slot 0 of a sequence's first token, then after each layer.
                if slot == 0 && t > r.start {
                    continue;
                }
                for ahead in 0..horizon {
                    let (tok, layer) = if slot + ahead < m {
                        (t, slot + ahead)
                    } else {
                        (t + 1, slot + ahead - m)
                    };
                    if tok >= r.end || (tok > t && layer > 0) {
                        continue;
                    }
                    let Some(truth) = view.layer(tok, layer) else {
                        continue;
                    };
                    let mut ids: Vec<u32> = truth
                        .iter()
                        .filter(|_| rng.random_bool(recall))
                        .map(|&x| (layer * e + x as usize) as u32)
                        .collect();
                    for _ in 0..wrong {
                        let x = rng.random_range(0..e);
                        let id = (layer * e + x) as u32;
                        if !ids.contains(&id) && !truth.contains(&(x as u16)) {
                            ids.push(id);
                        }
                    }
                    let probs = vec![claimed; ids.len()];
                    plan.push_scored(t, slot, &ids, &probs);
                }
            }
        }
    }
    plan
}

fn config(rng: &mut StdRng, total: usize) -> SimConfig {
    let compute = rng.random_range(1.0..50.0);
    let attention = if rng.random_bool(0.5) {
        rng.random_range(0.0..10.0)
    } else {
        0.0
    };
    let bandwidth = 10.0;
    // One read takes from a tenth of a layer to five layers.
    let read_us = (compute + attention) * rng.random_range(0.1..5.0);
    let expert_bytes = read_us * bandwidth * 1e3;
    SimConfig {
        capacity: ((total as f64 * rng.random_range(0.08..0.5)) as usize).max(1),
        per_layer: rng.random_bool(0.2),
        policy: ["lru", "lfu", "lfu-kept", "next-use"][rng.random_range(0..4)].into(),
        bandwidth_gbps: bandwidth,
        expert_bytes,
        compute_us_per_layer: compute,
        attention_us_per_layer: attention,
        untimed: false,
        deadline_order: rng.random_bool(0.7),
        chunk_bytes: expert_bytes * rng.random_range(0.02..0.5),
        planned: true,
    }
}

fn chunk_us(cfg: &SimConfig) -> f64 {
    cfg.chunk_bytes.min(cfg.expert_bytes) / (cfg.bandwidth_gbps * 1e3)
}

/// Reads that went through the demand path (misses, and late prefetches promoted).
fn demand_paths(r: &SimReport) -> f64 {
    (r.misses + r.late) as f64
}

#[test]
fn the_planner_never_delays_a_demand_read_beyond_one_chunk_and_never_loses_to_demand_paging() {
    let mut worst: f64 = f64::INFINITY;
    for seed in 0..24u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let trace = synthetic_trace(&SynthConfig {
            n_layers: rng.random_range(2..7),
            n_experts: rng.random_range(8..33),
            top_k: rng.random_range(1..4),
            sequences: 2,
            tokens_per_sequence: 150,
            stickiness: rng.random_range(0.0..0.6),
            zipf: rng.random_range(0.0..1.2),
            seed,
        });
        let view = trace.view();
        let seqs = view.sequence_ranges();
        let total = view.meta.n_moe() * view.meta.n_experts as usize;
        let cfg = config(&mut rng, total);
        let plan = noisy_plan(
            &view,
            rng.random_range(0.2..1.0),
            rng.random_range(0..6),
            rng.random_range(0.05..0.95),
            rng.random_range(1..4),
            seed,
        );
        let planned = simulate(&view, &seqs, &plan, &cfg).unwrap();
        assert_eq!(
            planned.hits + planned.late + planned.misses,
            planned.accesses
        );
        // A demand read waits at most for the chunk on the link.
        let bound = demand_paths(&planned) * chunk_us(&cfg) + 1e-6;
        assert!(
            planned.demand_wait_us <= bound,
            "seed {seed}: demand reads waited {} us for prefetches (bound {bound}) {cfg:?}",
            planned.demand_wait_us
        );
        // With byte-sized chunks, not at all.
        let fine = SimConfig {
            chunk_bytes: 1.0,
            ..cfg.clone()
        };
        let r = simulate(&view, &seqs, &plan, &fine).unwrap();
        assert!(
            r.demand_wait_us <= demand_paths(&r) * chunk_us(&fine) + 1e-6,
            "seed {seed}: {} us",
            r.demand_wait_us
        );
        let none = PrefetchPlan::empty("none", view.n_tokens(), view.meta.n_moe());
        let demand = simulate(
            &view,
            &seqs,
            &none,
            &SimConfig {
                planned: false,
                ..cfg.clone()
            },
        )
        .unwrap();
        let ratio = planned.tokens_per_s() / demand.tokens_per_s();
        worst = worst.min(ratio);
        assert!(
            ratio >= 0.99,
            "seed {seed}: planned prefetch {:.1} tokens/s against {:.1} on demand {cfg:?}",
            planned.tokens_per_s(),
            demand.tokens_per_s()
        );
    }
    println!("worst planned / on-demand tokens/s over the random cases: {worst:.3}");
}

/// Large experts over a slow link: reading every forecast expert makes decoding slower
/// than demand paging; the planner's reads do not, and still gain from a good forecast.
#[test]
fn at_large_expert_sizes_planned_prefetch_gains_where_a_fixed_budget_loses() {
    let trace = synthetic_trace(&SynthConfig {
        n_layers: 6,
        n_experts: 32,
        top_k: 2,
        sequences: 4,
        tokens_per_sequence: 200,
        stickiness: 0.2,
        zipf: 0.5,
        seed: 3,
    });
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let plan = noisy_plan(&view, 0.9, 2, 0.5, 2, 7);
    // A read takes 2.3 layers of compute (17 MB over 25 GB/s against 300 us).
    let cfg = SimConfig {
        capacity: 48,
        per_layer: false,
        policy: "lru".into(),
        bandwidth_gbps: 25.0,
        expert_bytes: 17.3e6,
        compute_us_per_layer: 300.0,
        attention_us_per_layer: 0.0,
        untimed: false,
        deadline_order: true,
        chunk_bytes: 1048576.0,
        planned: true,
    };
    let fixed_cfg = SimConfig {
        planned: false,
        chunk_bytes: 0.0,
        ..cfg.clone()
    };
    let none = PrefetchPlan::empty("none", view.n_tokens(), 6);
    let demand = simulate(&view, &seqs, &none, &fixed_cfg).unwrap();
    let fixed = simulate(&view, &seqs, &plan, &fixed_cfg).unwrap();
    let planned = simulate(&view, &seqs, &plan, &cfg).unwrap();
    let (d, f, p) = (
        demand.tokens_per_s(),
        fixed.tokens_per_s(),
        planned.tokens_per_s(),
    );
    assert!(
        f < d,
        "every forecast expert read: {f:.1} vs on demand {d:.1}"
    );
    assert!(p > d * 1.02, "planned {p:.1} vs on demand {d:.1}");
    let counts = planned.planner.expect("planner counts");
    assert!(counts.issued < counts.offered, "{counts:?}");
}

fn settings() -> PlannerSettings {
    PlannerSettings {
        read_us: 10.0,
        chunk_us: 1.0,
        layer_period_us: 30.0,
        top_k: 2,
        n_experts: 16,
        n_moe: 4,
        capacity: 16,
        issue_us: 0.0,
        wrong_reads_delay: false,
    }
}

/// Offers `c` (expert 19 of layer 1) 400 times; layer 1 uses it `used_in_ten` times in ten.
fn offer_and_route(p: &mut PrefetchPlanner, c: &Candidate, used_in_ten: usize) {
    for i in 0..400 {
        p.note_offered(c);
        let used: Vec<usize> = if i % 10 < used_in_ten {
            vec![19, 20]
        } else {
            vec![20, 21]
        };
        p.observe_layer(1, &used, 0);
    }
}

#[test]
fn the_planner_learns_calibration_from_routing() {
    let mut p = PrefetchPlanner::new(settings());
    let c = Candidate {
        id: 16 + 3,
        layers_ahead: 0,
        horizon: 0,
        prob: 0.9,
        rank: 0,
    };
    let before = p.calibrated(&c);
    assert_eq!(p.state().offered_probability, None, "nothing offered yet");
    // The forecaster says 0.9; its experts are used one time in ten.
    offer_and_route(&mut p, &c, 1);
    let after = p.calibrated(&c);
    assert!(
        before > 0.8 && (after - 0.1).abs() < 0.03,
        "{before} -> {after}"
    );
    // The state a runtime prints says so, with the timings it plans with.
    let state = p.state();
    let (said, used) = (state.offered_probability, state.calibrated_probability);
    // (What the forecaster said, to its histogram bin's centre: bins are 0.05 wide.)
    assert!((said.unwrap() - 0.9).abs() <= 0.025 + 1e-9, "{state:?}");
    assert!((used.unwrap() - 0.1).abs() < 1e-9, "{state:?}");
    assert_eq!((state.read_us, state.layer_period_us), (10.0, 30.0));
    // The same probability forecast three lookups ahead, right nine times in ten, is
    // calibrated apart.
    let far = Candidate { horizon: 3, ..c };
    offer_and_route(&mut p, &far, 9);
    let (near, far) = (p.calibrated(&c), p.calibrated(&far));
    assert!(near < 0.2 && far > 0.8, "{near} / {far}");
    // A ranking forecaster (no probabilities) is calibrated by rank.
    let ranked = Candidate {
        prob: f32::NAN,
        ..c
    };
    for _ in 0..200 {
        p.note_offered(&ranked);
        p.observe_layer(1, &[19, 20], 0);
    }
    assert!(p.calibrated(&ranked) > 0.9);
    // Ranks are calibrated per forecast horizon too: rank 3 comes true at the next
    // lookup and never three lookups ahead.
    let (near, far) = (
        Candidate {
            id: 16 + 4,
            rank: 3,
            ..ranked
        },
        Candidate {
            id: 16 + 4,
            rank: 3,
            horizon: 3,
            ..ranked
        },
    );
    for i in 0..400 {
        let (c, used): (&Candidate, &[usize]) = if i % 2 == 0 {
            (&near, &[20, 21])
        } else {
            (&far, &[19, 21])
        };
        p.note_offered(c);
        p.observe_layer(1, used, 0);
    }
    let (n, f) = (p.calibrated(&near), p.calibrated(&far));
    assert!(n > 0.85 && f < 0.15, "next lookup {n}, three ahead {f}");
}

#[test]
fn the_planner_reads_when_it_pays_and_not_when_it_lands_too_late() {
    let mut p = PrefetchPlanner::new(settings());
    let sure = Candidate {
        id: 5,
        layers_ahead: 0,
        horizon: 0,
        prob: 0.97,
        rank: 0,
    };
    let idle = LinkState {
        now: 0.0,
        link_free: 0.0,
        next_lookup: 30.0,
    };
    assert_eq!(p.judge(&sure, &idle, 0.0), Verdict::Issue);
    // The same read behind 40 us of queued reads lands after a demand read issued at
    // the lookup would.
    let busy = LinkState {
        link_free: 40.0,
        ..idle
    };
    assert_eq!(p.judge(&sure, &busy, 0.0), Verdict::Late);
    // Three layers ahead it has time.
    let far = Candidate {
        layers_ahead: 3,
        ..sure
    };
    assert_eq!(p.judge(&far, &busy, 0.0), Verdict::Issue);
    // Not for an expert that would evict one more likely to be needed.
    let unsure = Candidate { prob: 0.12, ..sure };
    assert_eq!(p.judge(&unsure, &idle, 0.5), Verdict::NotWorth);
}

/// A runtime whose wrong reads hold up the reads after it charges a candidate its
/// wrong read's link time at the link's load: an unsure read that pays on an idle link
/// does not on a loaded one, a sure one still does; a runtime that does not charge it
/// (the simulator's) reads the unsure one either way.
#[test]
fn a_wrong_reads_link_time_is_charged_at_the_links_load_where_the_runtime_says_so() {
    let unsure = Candidate {
        id: 5,
        layers_ahead: 0,
        horizon: 0,
        prob: 0.4,
        rank: 0,
    };
    let sure = Candidate {
        prob: 0.97,
        ..unsure
    };
    let idle = LinkState {
        now: 0.0,
        link_free: 0.0,
        next_lookup: 30.0,
    };
    // Lookups that each insert `reads` experts (demand reads; nothing staged).
    let planner = |charged: bool, reads: usize| {
        let mut p = PrefetchPlanner::new(PlannerSettings {
            wrong_reads_delay: charged,
            ..settings()
        });
        for _ in 0..400 {
            p.observe_layer(1, &[20, 21], reads);
        }
        p
    };
    // Four 10 us reads per 30 us lookup: more than the link carries, a load of 1.
    let mut loaded = planner(true, 4);
    assert!(
        (loaded.link_load() - 1.0).abs() < 1e-6,
        "{}",
        loaded.link_load()
    );
    assert_eq!(loaded.state().wrong_read_load, Some(loaded.link_load()));
    assert_eq!(loaded.judge(&unsure, &idle, 0.0), Verdict::NotWorth);
    assert_eq!(loaded.judge(&sure, &idle, 0.0), Verdict::Issue);
    // No reads: a wrong read holds nothing up.
    let mut light = planner(true, 0);
    assert!(light.link_load() < 0.01, "{}", light.link_load());
    assert_eq!(light.judge(&unsure, &idle, 0.0), Verdict::Issue);
    // Not charged: the loaded link's unsure read is issued.
    let mut uncharged = planner(false, 4);
    assert_eq!(uncharged.state().wrong_read_load, None);
    assert_eq!(uncharged.judge(&unsure, &idle, 0.0), Verdict::Issue);
}
