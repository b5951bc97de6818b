//! Cache simulation of the real routing traces in `../shared/traces` (run by
//! `make test-real`, ignored otherwise): the simulator's LRU hit rate, one sequence at a
//! time with a per-layer cache, must equal the LRU figure that `trace stats` derives
//! independently from reuse distances; then the history-based policies are swept at 10%
//! and 25% of the experts and printed.

use std::ops::Range;
use std::path::{Path, PathBuf};

use datasets::import::{import, ImportOptions};
use datasets::stats::compute;
use offload::prefetch;
use offload::simulate::{simulate, PrefetchPlan, SimConfig};

fn shared() -> PathBuf {
    std::env::var_os("MOECAST_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

fn cfg(capacity: usize, per_layer: bool, policy: &str, bytes: f64) -> SimConfig {
    SimConfig {
        capacity,
        per_layer,
        policy: policy.into(),
        bandwidth_gbps: 16.0,
        expert_bytes: bytes,
        compute_us_per_layer: 100.0,
        attention_us_per_layer: 0.0,
        untimed: false,
        deadline_order: false,
        chunk_bytes: 0.0,
        planned: false,
    }
}

#[test]
#[ignore = "needs ../shared/traces; run with `make test-real`"]
fn real_traces_lru_matches_statistics_and_policies_sweep() {
    let traces = shared().join("traces");
    let cases = [
        (
            "Qwen3-30B-A3B",
            "qwen3-30b-a3b_gemma4-26b_gptoss-120b/qwen.route.csv",
        ),
        (
            "Gemma-4-26B",
            "qwen3-30b-a3b_gemma4-26b_gptoss-120b/gemma.route.csv",
        ),
        (
            "gpt-oss-120b",
            "qwen3-30b-a3b_gemma4-26b_gptoss-120b/gptoss.route.csv",
        ),
        ("OLMoE", "olmoe-1b-7b_kimi-linear-48b/trace_olmoe_299.jsonl"),
        (
            "Kimi-Linear",
            "olmoe-1b-7b_kimi-linear-48b/trace_kimi_300.jsonl",
        ),
        ("Switch", "switch-base-8/router-trace.v2.json"),
    ];
    println!(
        "{:<14} {:>6} {:>8} {:>8} {:>9} {:>9} {:>8} {:>10} {:>10}",
        "trace", "cache", "LRU", "LFU", "kept LFU", "next-use", "Belady", "LRU+prev", "LRU+activ"
    );
    for (name, file) in cases {
        let t = import(&[traces.join(file)], None, &ImportOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .trace;
        let view = t.view();
        let (m, e, k) = (t.meta.n_moe(), t.meta.n_experts as usize, t.meta.top_k);
        let caps = [k, 2 * k];
        let stats = compute(&view, &caps);
        let seqs = view.sequence_ranges();
        let none = PrefetchPlan::empty("none", view.n_tokens(), m);
        for (i, &c) in caps.iter().enumerate() {
            let (mut hits, mut acc) = (0u64, 0u64);
            for s in &seqs {
                let r = simulate(
                    &view,
                    std::slice::from_ref(s),
                    &none,
                    &cfg(c as usize * m, true, "lru", 1e6),
                )
                .unwrap();
                hits += r.hits;
                acc += r.accesses;
            }
            let sim = hits as f64 / acc as f64;
            assert!(
                (sim - stats.lru_hit_rate[i]).abs() < 1e-9,
                "{name} LRU@{c}: simulator {sim} vs statistics {}",
                stats.lru_hit_rate[i]
            );
        }
        let bytes = t
            .meta
            .expert_bytes
            .as_ref()
            .map_or(1e6, |v| v.iter().sum::<u64>() as f64 / v.len() as f64);
        let prev = prefetch::previous(&view, &seqs);
        let activ = prefetch::activation(&view, &seqs, k as usize, 3, 0.9);
        for share in [0.10, 0.25] {
            let cap = ((m * e) as f64 * share).round().max(1.0) as usize;
            let hit = |plan: &PrefetchPlan, policy: &str| {
                simulate(&view, &seqs, plan, &cfg(cap, false, policy, bytes))
                    .unwrap()
                    .hit_rate()
            };
            let (lru, lfu, opt) = (hit(&none, "lru"), hit(&none, "lfu"), hit(&none, "belady"));
            let (kept, next_use) = (hit(&none, "lfu-kept"), hit(&none, "next-use"));
            assert!(
                [lru, lfu, kept, next_use].iter().all(|&h| opt + 1e-12 >= h),
                "{name}: OPT bounds demand paging"
            );
            println!(
                "{name:<14} {:>5.0}% {:>7.1}% {:>7.1}% {:>8.1}% {:>8.1}% {:>7.1}% {:>9.1}% {:>9.1}%",
                share * 100.0,
                100.0 * lru,
                100.0 * lfu,
                100.0 * kept,
                100.0 * next_use,
                100.0 * opt,
                100.0 * hit(&prev, "lru"),
                100.0 * hit(&activ, "lru")
            );
        }
    }
}

/// The real traces with their expert sizes (OLMoE's trace records none: its bf16
/// expert, 3 x 2048 x 1024).
const PLANNED_CASES: [(&str, &str, Option<f64>); 4] = [
    (
        "Qwen3-30B-A3B",
        "qwen3-30b-a3b_gemma4-26b_gptoss-120b/qwen.route.csv",
        None,
    ),
    (
        "Gemma-4-26B",
        "qwen3-30b-a3b_gemma4-26b_gptoss-120b/gemma.route.csv",
        None,
    ),
    (
        "gpt-oss-120b",
        "qwen3-30b-a3b_gemma4-26b_gptoss-120b/gptoss.route.csv",
        None,
    ),
    (
        "OLMoE",
        "olmoe-1b-7b_kimi-linear-48b/trace_olmoe_299.jsonl",
        Some(3.0 * 2048.0 * 1024.0 * 2.0),
    ),
];

/// A real trace and its mean expert size in bytes.
fn planned_case(name: &str, file: &str, size: Option<f64>) -> (datasets::RoutingTrace, f64) {
    let t = import(
        &[shared().join("traces").join(file)],
        None,
        &ImportOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
    .trace;
    let bytes = size.unwrap_or_else(|| {
        let v = t.meta.expert_bytes.as_ref().expect("recorded expert sizes");
        v.iter().sum::<u64>() as f64 / v.len() as f64
    });
    (t, bytes)
}

/// Each sequence cut in two: the first halves (fitted on) and the second (replayed).
fn halves(view: &datasets::TraceView<'_>) -> (Vec<Range<usize>>, Vec<Range<usize>>) {
    view.sequence_ranges()
        .into_iter()
        .map(|r| {
            let mid = r.start + r.len() / 2;
            (r.start..mid, mid..r.end)
        })
        .unzip()
}

/// Planned prefetch on the real traces at their recorded expert sizes, 25 GB/s and 300
/// us of compute per layer: never slower than fetching on demand with the same policy,
/// printed beside the best on-demand policy, fixed-budget prefetch and the oracle. No
/// predictor ships for these models: the counts behind `token`, `coactivation` and
/// `blend` are fitted twice. **In sample**, on the whole trace (149-299
/// tokens), which is what the planner's guarantee has to hold for, and where the online
/// blend must close at least 50% of the gap to the oracle reading as far ahead as it
/// does (the prefetch issue's target); and **held
/// out**, on the first half of each sequence with the second half replayed, which is
/// what a model whose counts come from other text would see (printed, and never slower
/// either). The blend's weights are learned online, from the tokens before each
/// forecast. (A predictor trained on the first halves: the next test.)
#[test]
#[ignore = "needs ../shared/traces; run with `make test-real`"]
fn planned_prefetch_is_never_slower_than_demand_paging_on_real_traces() {
    use datasets::examples::RoutingShape;
    use predictor::baselines::BaselineStats;
    let cases: Vec<_> = PLANNED_CASES
        .iter()
        .map(|&(name, file, size)| (name, planned_case(name, file, size)))
        .collect();
    for held_out in [false, true] {
        println!(
            "counts fitted {}",
            if held_out {
                "on the first half of each sequence, the second half replayed (held out)"
            } else {
                "on the whole trace, the whole trace replayed (in sample)"
            }
        );
        for (name, (t, bytes)) in &cases {
            let (name, bytes) = (*name, *bytes);
            let view = t.view();
            let (m, k) = (t.meta.n_moe(), t.meta.top_k as usize);
            let (fit, replay) = if held_out {
                halves(&view)
            } else {
                (view.sequence_ranges(), view.sequence_ranges())
            };
            let mut stats = BaselineStats::new(RoutingShape::of(&t.meta), 3.min(m - 1).max(1));
            for r in &fit {
                stats.add_tokens(&view, r.clone());
            }
            let plans = [
                prefetch::previous(&view, &replay),
                prefetch::token(&view, &replay, &stats, 2 * k, 3),
                prefetch::coactivation(&view, &replay, &stats, 2 * k, 3),
                prefetch::blend(&view, &replay, &stats, 2 * k, 3).0,
            ];
            for (share, closed) in planned_prefetch_table(name, &view, &replay, &plans, bytes) {
                if !held_out {
                    assert!(
                        closed[3].is_none_or(|c| c >= 0.50),
                        "{name} {share}: the blend closes {:?} of the gap to the oracle",
                        closed[3]
                    );
                }
            }
        }
    }
}

/// Learned prefetch where the prefetch issue asks for it: a lookahead predictor trained
/// (`predictor::train`, its defaults, at most 10 epochs) on the first half of each
/// sequence of a real trace (in pieces of 16 tokens, a tenth of them for validation),
/// the second half replayed at the trace's expert size, beside the counts
/// of the same first halves (the predictor's baselines) behind co-activation and the
/// blend. Planned prefetch is never slower than demand paging; the gap closed is
/// printed (the first halves hold 74-149 tokens, about 60-130 of them trained on).
#[test]
#[ignore = "needs ../shared/traces; run with `make test-real`"]
fn learned_prefetch_on_held_out_real_routing() {
    use datasets::examples::{RoutingShape, SplitConfig};
    use predictor::{LoadedPredictor, OnlinePredictor, PredictorConfig, Task, TrainOptions};
    let dir = tempfile::tempdir().unwrap();
    println!("a lookahead predictor trained on the first half of each sequence, the second half replayed (held out)");
    for (name, file, size) in PLANNED_CASES {
        let (t, bytes) = planned_case(name, file, size);
        let view = t.view();
        let k = t.meta.top_k as usize;
        let (fit, replay) = halves(&view);
        // Pieces of 16 tokens, so that about a tenth can be held out for validation.
        let traces: Vec<PathBuf> = fit
            .iter()
            .flat_map(|r| r.clone().step_by(16).map(move |s| s..(s + 16).min(r.end)))
            .enumerate()
            .map(|(i, r)| {
                let path = dir.path().join(format!("{name}-{i}.mctrace"));
                datasets::binary::write_binary(&view.tokens(r.clone()).to_owned_trace(), &path)
                    .unwrap();
                path
            })
            .collect();
        let out = dir.path().join(name);
        let started = std::time::Instant::now();
        let split = SplitConfig {
            validation: 0.1,
            test: 0.0,
            seed: 0,
        };
        let set = datasets::examples::ExampleSet::open(&traces, &split).unwrap();
        let trained: usize = set
            .split(datasets::examples::Split::Train)
            .map(|s| s.tokens.len())
            .sum();
        predictor::train(&TrainOptions {
            traces,
            config: PredictorConfig::new(RoutingShape::of(&t.meta), Task::Lookahead),
            split,
            settings: predictor::TrainSettings {
                max_epochs: 10,
                batch_size: 4,
                warmup_steps: 20,
                ..predictor::TrainSettings::default()
            },
            backend: predictor::device::BackendKind::Flex,
            out: out.clone(),
            progress: false,
            run_steps: None,
        })
        .unwrap_or_else(|e| panic!("{name}: training: {e}"));
        let loaded =
            LoadedPredictor::load(&out, &predictor::device::BackendKind::Flex.device()).unwrap();
        let stats = loaded.baselines.clone().expect("the predictor's counts");
        println!(
            "{name}: trained on {trained} of the first halves' {} tokens in {:.0} s",
            fit.iter().map(|r| r.len()).sum::<usize>(),
            started.elapsed().as_secs_f64()
        );
        let mut online = OnlinePredictor::new(loaded);
        let plans = [
            prefetch::coactivation(&view, &replay, &stats, 2 * k, 3),
            prefetch::blend(&view, &replay, &stats, 2 * k, 3).0,
            prefetch::learned(&view, &replay, &mut online, 2 * k, 3).unwrap(),
        ];
        planned_prefetch_table(name, &view, &replay, &plans, bytes);
    }
}

/// One trace's rows of the planned-prefetch table for `plans` over the sequences
/// `seqs`, for caches of 10% and 25%: asserts planned >= on demand per policy and
/// returns, per cache share, the share of the gap between the best on-demand policy and
/// the oracle (the fastest of reading one to three layers ahead, as far as the plans
/// read) that each plan closes planned (`None` where that gap is under 10%).
fn planned_prefetch_table(
    name: &str,
    view: &datasets::TraceView<'_>,
    seqs: &[Range<usize>],
    plans: &[PrefetchPlan],
    bytes: f64,
) -> Vec<(f64, Vec<Option<f64>>)> {
    let (m, e, k) = (
        view.meta.n_moe(),
        view.meta.n_experts as usize,
        view.meta.top_k as usize,
    );
    println!(
        "{:<14} {:>5} {:<13} {:>9} {:>9} {:>9} {:>8} {:>10}",
        "trace", "cache", "prefetch", "on-demand", "fixed", "planned", "oracle", "gap closed"
    );
    let none = PrefetchPlan::empty("none", view.n_tokens(), m);
    // The oracle reads up to three layers ahead, as the plans do: the fastest lead.
    let oracles: Vec<PrefetchPlan> = (1..=3).map(|h| prefetch::oracle(view, seqs, h)).collect();
    let mut out = Vec::new();
    for share in [0.10, 0.25] {
        let cap = ((m * e) as f64 * share).round().max(1.0) as usize;
        let run = |plan: &PrefetchPlan, policy: &str, planned: bool| {
            let c = SimConfig {
                bandwidth_gbps: 25.0,
                compute_us_per_layer: 300.0,
                deadline_order: true,
                chunk_bytes: if planned { 1048576.0 } else { 0.0 },
                planned,
                ..cfg(cap, false, policy, bytes)
            };
            simulate(view, seqs, plan, &c).unwrap().tokens_per_s()
        };
        let best_demand = ["lru", "lfu", "lfu-kept", "next-use"]
            .iter()
            .map(|p| run(&none, p, false))
            .fold(0.0, f64::max);
        let closed = |tokens_per_s: f64, oracle: f64| {
            let gap = oracle - best_demand;
            (gap > 0.1 * best_demand).then(|| (tokens_per_s - best_demand) / gap)
        };
        let row = |label: String, fixed: f64, planned: f64, oracle: f64| {
            let gap = closed(planned, oracle).map_or("-".into(), |c| format!("{:.1}%", 100.0 * c));
            println!(
                "{name:<14} {:>4.0}% {label:<13} {best_demand:>9.1} {fixed:>9.1} {planned:>9.1} {oracle:>8.1} {gap:>9}",
                share * 100.0
            );
        };
        // Per prefetcher, the best of the three policies (fixed, planned).
        let mut best = vec![(0.0f64, 0.0f64); plans.len()];
        let mut best_oracle = 0.0f64;
        for policy in ["lru", "lfu-kept", "next-use"] {
            let demand = run(&none, policy, false);
            let oracle_tps = oracles
                .iter()
                .map(|o| run(o, policy, false))
                .fold(0.0, f64::max);
            best_oracle = best_oracle.max(oracle_tps);
            for (plan, b) in plans.iter().zip(best.iter_mut()) {
                let planned = run(plan, policy, true);
                let fixed = run(&plan.truncated(k, e), policy, false);
                assert!(
                    planned >= demand * 0.995,
                    "{name} {policy} {share}: planned {} {planned:.1} tokens/s < on demand {demand:.1}",
                    plan.name
                );
                *b = (b.0.max(fixed), b.1.max(planned));
                row(
                    format!("{policy}+{}", plan.name),
                    fixed,
                    planned,
                    oracle_tps,
                );
            }
        }
        for (plan, &(fixed, planned)) in plans.iter().zip(&best) {
            row(format!("best+{}", plan.name), fixed, planned, best_oracle);
        }
        out.push((
            share,
            best.iter().map(|&(_, p)| closed(p, best_oracle)).collect(),
        ));
    }
    out
}
