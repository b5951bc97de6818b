//! The blend, the staging planner and the prefetch guard through the C ABI against their
//! Rust types: the same forecasts, the same staged reads (driven by a C program), the
//! same verdicts; bad arguments are error codes with a message.

mod common;

use std::ffi::CString;
use std::fmt::Write as _;
use std::path::Path;

use common::*;
use moecast::*;
use planner::{LinkQueue, PlanTimings, StagingPlanner};

/// The blend through the C ABI, opened on a trace, forecasts what `OnlineBlend` over the
/// same counts forecasts, token by token; bad arguments are error codes.
#[test]
fn the_blend_through_the_c_abi_forecasts_as_online_blend_does() {
    use predictor::blend::{load_counts, OnlineBlend};
    let dir = tempfile::tempdir().unwrap();
    let (_, trace) = trained(dir.path());
    let path = dir.path().join("t.mctrace");
    let view = trace.view();
    let (m, k) = (view.meta.n_moe(), view.meta.top_k as usize);
    let mut rust = OnlineBlend::new(load_counts(&path, m).unwrap(), OnlineBlend::HORIZON);
    let h = rust.horizon();
    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: every pointer below is either null on purpose or valid.
    unsafe {
        let mut b = std::ptr::null_mut();
        assert_eq!(mc_blend_open(c_path.as_ptr(), &mut b), MC_OK);
        let (mut mm, mut e, mut kk, mut hh) = (0, 0, 0, 0);
        assert_eq!(mc_blend_shape(b, &mut mm, &mut e, &mut kk, &mut hh), MC_OK);
        assert_eq!((mm, e, kk, hh), (4, 8, 2, h as u32));
        let (mut out, mut probs) = (vec![0u16; h * BUDGET], vec![0f32; h * BUDGET]);
        let mut ranking = Vec::new();
        let mut compared = 0;
        for seq in view.sequence_ranges() {
            assert_eq!(mc_blend_reset(b), MC_OK);
            rust.start_request();
            for t in seq {
                let layers: Vec<&[u16]> = (0..m).map(|l| view.layer(t, l).unwrap()).collect();
                for l in 0..m {
                    let earlier = if l == 0 {
                        std::ptr::null()
                    } else {
                        layers[l - 1].as_ptr()
                    };
                    let code = mc_blend_forecast(
                        b,
                        l as u32,
                        layers[l].as_ptr(),
                        earlier,
                        BUDGET as u32,
                        out.as_mut_ptr(),
                        probs.as_mut_ptr(),
                    );
                    assert_eq!(code, MC_OK, "{}", last_error());
                    let mut want = vec![u16::MAX; h * BUDGET];
                    let mut want_probs = vec![0f32; h * BUDGET];
                    let earlier = l.checked_sub(1).map(|p| layers[p]);
                    rust.forecast(l, layers[l], earlier, |target, scores| {
                        predictor::metrics::rank_top(scores, BUDGET, &mut ranking);
                        // Past the last layer, the next token's.
                        let row = (target + m - l - 1) % m * BUDGET;
                        want[row..row + BUDGET].copy_from_slice(&ranking);
                        for (i, &x) in ranking.iter().enumerate() {
                            want_probs[row + i] = OnlineBlend::probability(scores[x as usize]);
                        }
                    });
                    assert_eq!(out, want, "token {t}, layer {l}");
                    assert_eq!(probs, want_probs, "token {t}, layer {l}");
                    // Best first.
                    for row in probs.chunks(BUDGET) {
                        assert!(row.windows(2).all(|w| w[0] >= w[1]), "{row:?}");
                    }
                    compared += 1;
                }
                let flat: Vec<u16> = layers.concat();
                assert_eq!(mc_blend_observe(b, view.token[t], flat.as_ptr()), MC_OK);
                let routed: Vec<Option<&[u16]>> = layers.iter().map(|l| Some(*l)).collect();
                rust.token_routed(view.token[t], &routed);
            }
        }
        assert!(compared > 100);
        // Bad arguments: a layer past the last, budget 0, an expert out of range, nulls.
        let ids = [1u16, 2];
        let bad = [1u16, 99];
        let out_ptr = out.as_mut_ptr();
        let forecast = |layer, ids: &[u16], budget| {
            mc_blend_forecast(
                b,
                layer,
                ids.as_ptr(),
                std::ptr::null(),
                budget,
                out_ptr,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(forecast(4, &ids, 2), MC_ERR_ARG);
        assert!(last_error().contains("layer 4"), "{}", last_error());
        assert_eq!(forecast(0, &ids, 0), MC_ERR_ARG);
        assert_eq!(forecast(0, &ids, 9), MC_ERR_ARG);
        assert!(last_error().contains("budget 9"), "{}", last_error());
        // After the last layer the rows are the next token's first layers.
        assert_eq!(forecast(3, &ids, 2), MC_OK);
        assert!(out[..h * 2].iter().all(|&x| u32::from(x) < e));
        assert_eq!(forecast(0, &bad, 2), MC_ERR_ARG);
        assert!(last_error().contains("expert 99"), "{}", last_error());
        assert_eq!(forecast(0, &ids, 2), MC_OK);
        let short = vec![0u16; k * m - 1];
        let mut routing = short.clone();
        routing.push(99);
        assert_eq!(mc_blend_observe(b, 3, routing.as_ptr()), MC_ERR_ARG);
        assert_eq!(mc_blend_observe(b, 3, std::ptr::null()), MC_ERR_NULL);
        assert_eq!(
            mc_blend_observe(std::ptr::null_mut(), 3, short.as_ptr()),
            MC_ERR_NULL
        );
        let missing = CString::new(dir.path().join("nope.mctrace").to_str().unwrap()).unwrap();
        let mut other = std::ptr::null_mut();
        assert_eq!(mc_blend_open(missing.as_ptr(), &mut other), MC_ERR_OPEN);
        assert!(last_error().contains("nope.mctrace"), "{}", last_error());
        mc_blend_free(b);
    }
}

/// What `tests/staging.c` prints for `trace`, made with `OnlineBlend` and
/// `StagingPlanner` the way a Rust runtime would call them.
fn stage_in_rust(counts: &Path, trace: &datasets::RoutingTrace, timings: PlanTimings) -> String {
    use predictor::blend::{load_counts, OnlineBlend};
    let view = trace.view();
    let (m, e, k) = (view.meta.n_moe(), 8, view.meta.top_k as usize);
    let mut blend = OnlineBlend::new(load_counts(counts, m).unwrap(), OnlineBlend::HORIZON);
    let h = blend.horizon();
    let mut plan = StagingPlanner::new(m, e, k, 8, Some(timings)).unwrap();
    let (mut ids, mut probs) = (vec![0u16; h * BUDGET], vec![0f32; h * BUDGET]);
    let mut staged = vec![false; m * e];
    let mut want = String::new();
    for seq in view.sequence_ranges() {
        blend.start_request();
        for t in seq {
            let layers: Vec<&[u16]> = (0..m).map(|l| view.layer(t, l).unwrap()).collect();
            plan.token_started();
            for l in 0..m {
                let demand = layers[l].iter().filter(|&&x| !staged[l * e + x as usize]);
                let demand = demand.count();
                staged[l * e..(l + 1) * e].fill(false);
                plan.layer_routed(l, layers[l], demand).unwrap();
                let earlier = l.checked_sub(1).map(|p| layers[p]);
                blend.forecast_top(l, layers[l], earlier, BUDGET, &mut ids, Some(&mut probs));
                write!(want, "P {l}:").unwrap();
                for i in 0..h {
                    let row = i * BUDGET..(i + 1) * BUDGET;
                    let queue = LinkQueue::default();
                    let out = plan
                        .plan(
                            (l + 1 + i) % m,
                            &ids[row.clone()],
                            Some(&probs[row]),
                            None,
                            queue,
                            m * e,
                        )
                        .unwrap();
                    for id in out {
                        staged[id as usize] = true;
                        write!(want, " {id}").unwrap();
                    }
                }
                want.push('\n');
            }
            let routed: Vec<Option<&[u16]>> = layers.iter().map(|l| Some(*l)).collect();
            blend.token_routed(view.token[t], &routed);
        }
    }
    let c = plan.counts();
    writeln!(
        want,
        "R {} {} {} {}",
        c.offered, c.issued, c.late, c.not_worth
    )
    .unwrap();
    want
}

/// The planner through the C ABI, driven by a C program with the blend's forecasts,
/// stages exactly what `StagingPlanner` stages: reads when they are a third of a layer,
/// none when they are a hundred layers long. Bad arguments are error codes.
#[test]
fn a_c_program_plans_prefetch_as_the_rust_planner_does() {
    let dir = tempfile::tempdir().unwrap();
    let (path, trace) = synthetic_trace(dir.path());
    let input = dir.path().join("routing.txt");
    std::fs::write(&input, routing_input(&trace)).unwrap();
    let exe = build_c(dir.path(), "staging");
    for (read_us, any_staged) in [(300.0, true), (100_000.0, false)] {
        let timings = PlanTimings {
            read_us,
            layer_us: 1000.0,
        };
        let want = stage_in_rust(&path, &trace, timings);
        let numbers = [
            BUDGET.to_string(),
            read_us.to_string(),
            "1000".into(),
            "8".into(),
        ];
        let mut args = vec![path.as_path(), input.as_path()];
        args.extend(numbers.iter().map(Path::new));
        let got = run_c(&exe, &args);
        assert!(
            got == want,
            "the C planner differs from StagingPlanner:\n{got}\n{want}"
        );
        let report: Vec<u64> = got
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("R "))
            .unwrap()
            .split(' ')
            .map(|x| x.parse().unwrap())
            .collect();
        assert!(report[0] > 100, "{report:?}");
        assert_eq!(report[1] > 0, any_staged, "read {read_us} us: {report:?}");
    }
    // SAFETY: every pointer below is either null on purpose or valid.
    unsafe {
        let mut p = std::ptr::null_mut();
        assert_eq!(mc_planner_new(4, 8, 9, 8, 0.0, 0.0, &mut p), MC_ERR_ARG);
        assert!(last_error().contains("top-9"), "{}", last_error());
        assert_eq!(mc_planner_new(4, 8, 2, 8, 100.0, 0.0, &mut p), MC_ERR_ARG);
        assert!(last_error().contains("layer_us 0"), "{}", last_error());
        assert_eq!(
            mc_planner_new(4, 8, 2, 8, 0.0, 0.0, std::ptr::null_mut()),
            MC_ERR_NULL
        );
        assert_eq!(mc_planner_new(4, 8, 2, 8, 0.0, 0.0, &mut p), MC_OK);
        assert_eq!(mc_planner_token_started(p), MC_OK);
        let (ids, mut out, mut n) = ([1u16, 2], [0u32; 4], 0u32);
        let plan = |layer, ids: &[u16], out: &mut [u32], n: *mut u32| {
            let (o, room) = (out.as_mut_ptr(), out.len() as u32);
            let (r, pr, res) = (ids.as_ptr(), std::ptr::null(), std::ptr::null());
            mc_planner_plan(p, layer, r, pr, res, ids.len() as u32, 0, 1, o, room, n)
        };
        assert_eq!(plan(4, &ids, &mut out, &mut n), MC_ERR_ARG);
        assert!(last_error().contains("layer 4"), "{}", last_error());
        assert_eq!(plan(1, &[1, 8], &mut out, &mut n), MC_ERR_ARG);
        assert!(last_error().contains("expert 8"), "{}", last_error());
        assert_eq!(plan(1, &ids, &mut out, std::ptr::null_mut()), MC_ERR_NULL);
        // Untimed until a read is measured: ranks judged by their calibration alone.
        assert_eq!(plan(1, &ids, &mut out, &mut n), MC_OK);
        assert!(
            n <= 2 && out[..n as usize].iter().all(|&x| x / 8 == 1),
            "{out:?}"
        );
        assert_eq!(mc_planner_evicted(p, 32), MC_ERR_ARG);
        assert!(last_error().contains("expert id 32"), "{}", last_error());
        assert_eq!(mc_planner_evicted(p, 31), MC_OK);
        assert_eq!(mc_planner_read_done(p, -1.0), MC_ERR_ARG);
        assert_eq!(mc_planner_read_done(p, 0.002), MC_OK);
        assert_eq!(
            mc_planner_layer_routed(p, 0, [9u16, 1].as_ptr(), 2, 2),
            MC_ERR_ARG
        );
        assert_eq!(mc_planner_layer_routed(p, 0, ids.as_ptr(), 2, 2), MC_OK);
        let mut r = mc_plan_report::default();
        assert_eq!(mc_planner_report(p, &mut r), MC_OK);
        assert_eq!((r.offered, r.read_us), (2, 2000.0));
        assert_eq!(mc_planner_report(p, std::ptr::null_mut()), MC_ERR_NULL);
        mc_planner_free(p);
        mc_planner_free(std::ptr::null_mut());
        // With reads of 10 us and layers of 1 ms both forecasts of a layer ahead are worth
        // a read, but one marked resident is never returned, call after call.
        assert_eq!(mc_planner_new(4, 8, 2, 32, 10.0, 1000.0, &mut p), MC_OK);
        assert_eq!(mc_planner_token_started(p), MC_OK);
        for (layer, held) in [(2u32, [1u8, 0]), (3, [0, 1]), (1, [0, 0])] {
            let (r, res, o) = (ids.as_ptr(), held.as_ptr(), out.as_mut_ptr());
            let status = mc_planner_plan(p, layer, r, std::ptr::null(), res, 2, 0, 8, o, 4, &mut n);
            assert_eq!(status, MC_OK);
            let staged = &out[..n as usize];
            for (&e, &h) in ids.iter().zip(&held) {
                let id = layer * 8 + u32::from(e);
                assert_eq!(staged.contains(&id), h == 0, "layer {layer}: {staged:?}");
            }
        }
        mc_planner_free(p);
    }
}

#[test]
fn the_guard_through_the_c_abi_decides_as_prefetch_guard_does() {
    let mut g = std::ptr::null_mut();
    // SAFETY: each pointer below is either live or null on purpose.
    unsafe {
        assert_eq!(mc_guard_new(0, 6, &mut g), MC_ERR_ARG);
        assert!(last_error().contains("at least 1"), "{}", last_error());
        assert_eq!(mc_guard_new(8, 6, std::ptr::null_mut()), MC_ERR_NULL);
        assert_eq!(mc_guard_new(8, 6, &mut g), MC_OK);
        let mut rust = planner::PrefetchGuard::new(8, 6);
        let (mut on, mut windows) = (0u8, 0);
        for step in 0..400 {
            assert_eq!(mc_guard_enabled(g, &mut on), MC_OK);
            assert_eq!(on == 1, rust.enabled(), "step {step}");
            // Prefetch makes steps slower for the first 200 steps, faster after.
            let seconds = match (on == 1, step < 200) {
                (true, true) | (false, false) => 0.12,
                _ => 0.10,
            };
            let mut w = mc_guard_window::default();
            assert_eq!(mc_guard_step_done(g, seconds, &mut w), MC_OK);
            let want = rust.step_done(seconds);
            assert_eq!(w.ended == 1, want.is_some(), "step {step}");
            if let Some((prefetch, mean_s)) = want {
                windows += 1;
                assert_eq!((w.prefetch == 1, w.mean_s), (prefetch, mean_s));
            }
        }
        let mut off = 0u64;
        assert_eq!(mc_guard_steps_off(g, &mut off), MC_OK);
        assert_eq!(off, rust.steps_off);
        assert!(
            windows > 40 && off > 100 && off < 300,
            "{windows} windows, {off} steps off"
        );
        assert_eq!(
            mc_guard_step_done(g, f64::NAN, std::ptr::null_mut()),
            MC_ERR_ARG
        );
        assert!(last_error().contains("not a duration"), "{}", last_error());
        assert_eq!(mc_guard_enabled(std::ptr::null(), &mut on), MC_ERR_NULL);
        mc_guard_free(g);
        mc_guard_free(std::ptr::null_mut());
    }
}
