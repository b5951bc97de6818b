//! The C ABI against the Rust serving path: the committed header is what cbindgen makes
//! of the source; a C program built with the system compiler replays a trace through
//! the library and prints exactly the forecasts `OnlinePredictor` makes; bad arguments
//! are error codes with a message, never undefined behaviour.

use std::ffi::{c_int, CStr, CString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use datasets::examples::{RoutingShape, SplitConfig};
use datasets::synth::{token_routed_trace, SynthConfig};
use datasets::{save_trace, TraceFormat};
use moecast::*;
use planner::{LinkQueue, PlanTimings, StagingPlanner};
use predictor::device::BackendKind;
use predictor::{LoadedPredictor, OnlinePredictor, PredictorConfig, Task, TrainOptions};

const BUDGET: usize = 3;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_header_is_what_cbindgen_generates() {
    let config = cbindgen::Config::from_file(manifest().join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(manifest().join("src/lib.rs"))
        .generate()
        .expect("cbindgen parses ffi/src/lib.rs")
        .write(&mut generated);
    let header = manifest().join("include/moecast.h");
    if std::env::var_os("MOECAST_WRITE_HEADER").is_some() {
        std::fs::write(&header, &generated).unwrap();
    }
    let committed = std::fs::read(&header).unwrap_or_default();
    assert!(
        committed == generated,
        "ffi/include/moecast.h is stale: run `make header` and commit it"
    );
}

/// A synthetic trace (4 MoE layers x 8 experts, top-2), saved as `dir/t.mctrace`.
fn synthetic_trace(dir: &Path) -> (PathBuf, datasets::RoutingTrace) {
    let trace = token_routed_trace(
        &SynthConfig {
            n_layers: 4,
            n_experts: 8,
            top_k: 2,
            sequences: 12,
            tokens_per_sequence: 20,
            seed: 4,
            ..SynthConfig::default()
        },
        30,
    );
    let path = dir.join("t.mctrace");
    save_trace(&trace, &path, Some(TraceFormat::Binary)).unwrap();
    (path, trace)
}

/// A small lookahead predictor trained on a synthetic trace, and the trace.
fn trained(dir: &Path) -> (PathBuf, datasets::RoutingTrace) {
    let (path, trace) = synthetic_trace(dir);
    let shape = RoutingShape::of(&trace.meta);
    let out = dir.join("predictor");
    let mut opts = TrainOptions {
        traces: vec![path],
        config: PredictorConfig::new(shape, Task::Lookahead)
            .with_horizon(2)
            .with_d_model(16)
            .with_n_layers(1)
            .with_n_heads(2)
            .with_context(16),
        split: SplitConfig::default(),
        settings: predictor::TrainSettings {
            shards: 2,
            ..Default::default()
        },
        backend: BackendKind::from_test_env(),
        out: out.clone(),
        progress: false,
        run_steps: None,
    };
    opts.settings.max_epochs = 2;
    predictor::train(&opts).unwrap();
    (out, trace)
}

/// The C program's input for `trace`, and the lines it must print, made with
/// `OnlinePredictor` the way a Rust runtime would call it.
fn replay_in_rust(dir: &Path, trace: &datasets::RoutingTrace) -> (String, String) {
    let view = trace.view();
    let m = view.meta.n_moe();
    let loaded = LoadedPredictor::load(dir, &BackendKind::Flex.device()).unwrap();
    let horizon = loaded.card.config.horizon.min(m - 1);
    let mut online = OnlinePredictor::new(loaded);
    let mut want = String::new();
    for seq in view.sequence_ranges() {
        online.reset();
        for t in seq {
            let token = view.token[t];
            let layers: Vec<&[u16]> = (0..m).map(|l| view.layer(t, l).unwrap()).collect();
            let f = online.predict_next(token).unwrap();
            let top: Vec<u16> = (0..m).flat_map(|l| f.top(l, BUDGET)).collect();
            line(&mut want, "N", token, &top);
            for known in 1..m {
                let f = online.predict_lookahead(token, &layers[..known]).unwrap();
                let mut top: Vec<u16> = (known..known + f.n_layers())
                    .flat_map(|l| f.top(l, BUDGET))
                    .collect();
                top.resize(horizon * BUDGET, u16::MAX);
                line(&mut want, "L", known as u32, &top);
            }
            let routing: Vec<Option<&[u16]>> = layers.iter().map(|l| Some(*l)).collect();
            online.observe(token, &routing).unwrap();
        }
    }
    (routing_input(trace), want)
}

/// The C programs' input for `trace`: "S" starts a sequence, "T token ids..." is one
/// token with its routing, layer-major.
fn routing_input(trace: &datasets::RoutingTrace) -> String {
    let view = trace.view();
    let m = view.meta.n_moe();
    let mut input = String::new();
    for seq in view.sequence_ranges() {
        input += "S\n";
        for t in seq {
            let ids: Vec<String> = (0..m)
                .flat_map(|l| view.layer(t, l).unwrap().iter())
                .map(|x| x.to_string())
                .collect();
            writeln!(input, "T {} {}", view.token[t], ids.join(" ")).unwrap();
        }
    }
    input
}

fn line(out: &mut String, tag: &str, n: u32, ids: &[u16]) {
    write!(out, "{tag} {n}:").unwrap();
    for x in ids {
        write!(out, " {x}").unwrap();
    }
    out.push('\n');
}

/// The folder holding `libmoecast`: beside the test binary (`target/<profile>/deps/`,
/// where `cargo test` leaves it) or one level up (`cargo build`).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    let up = deps.parent().unwrap().to_path_buf();
    [deps, up]
        .into_iter()
        .find(|d| d.join("libmoecast.so").exists())
        .expect("libmoecast.so built beside the tests")
}

/// Builds the C program `tests/<name>.c` against libmoecast into `dir`.
fn build_c(dir: &Path, name: &str) -> PathBuf {
    let exe = dir.join(name);
    let lib = library_dir();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Werror", "-I"])
        .arg(manifest().join("include"))
        .arg(manifest().join(format!("tests/{name}.c")))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lmoecast", "-o"])
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("{cc}: {e}"));
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    exe
}

/// Runs the C program `exe` with `args`; its output, once it has succeeded.
fn run_c(exe: &Path, args: &[&Path]) -> String {
    let ran = Command::new(exe).args(args).output().unwrap();
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    String::from_utf8(ran.stdout).unwrap()
}

#[test]
fn a_c_program_replays_a_trace_as_the_rust_serving_path_does() {
    let dir = tempfile::tempdir().unwrap();
    let (predictor_dir, trace) = trained(dir.path());
    let (input, want) = replay_in_rust(&predictor_dir, &trace);
    let input_file = dir.path().join("routing.txt");
    std::fs::write(&input_file, input).unwrap();
    let exe = build_c(dir.path(), "replay");
    let got = run_c(
        &exe,
        &[&predictor_dir, &input_file, Path::new(&BUDGET.to_string())],
    );
    assert_eq!(got.lines().count(), want.lines().count());
    assert!(got == want, "the C replay differs from OnlinePredictor");
}

fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(mc_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A call's result `code` is the error `want`, and the error message holds `message`.
fn assert_refused(code: c_int, want: c_int, message: &str) {
    assert_eq!(code, want, "{}", last_error());
    assert!(last_error().contains(message), "{}", last_error());
}

/// Sequence `s` of trace `t` through `mc_trace_sequence`: its token ids and its experts
/// (`width` a token).
///
/// # Safety
/// `t` is a live trace; the slices are valid while it lives.
unsafe fn trace_sequence<'a>(t: *const mc_trace, s: u32, width: usize) -> (&'a [u32], &'a [u16]) {
    let (mut len, mut tokens, mut experts) = (0u32, std::ptr::null(), std::ptr::null());
    // SAFETY: `t` is live (the caller's promise); the out pointers are locals.
    let code = unsafe { mc_trace_sequence(t, s, &mut len, &mut tokens, &mut experts) };
    assert_eq!(code, MC_OK, "{}", last_error());
    let n = len as usize;
    // SAFETY: the trace owns `n` ids and `n * width` experts while it lives.
    unsafe {
        (
            std::slice::from_raw_parts(tokens, n),
            std::slice::from_raw_parts(experts, n * width),
        )
    }
}

#[test]
fn bad_arguments_are_error_codes_with_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (predictor_dir, _) = trained(dir.path());
    let path = CString::new(predictor_dir.to_str().unwrap()).unwrap();
    // SAFETY: every pointer below is either null on purpose or valid.
    unsafe {
        let mut p = std::ptr::null_mut();
        assert_eq!(mc_predictor_open(std::ptr::null(), &mut p), MC_ERR_NULL);
        assert!(last_error().contains("dir"), "{}", last_error());
        let missing = CString::new(dir.path().join("nope").to_str().unwrap()).unwrap();
        assert_eq!(mc_predictor_open(missing.as_ptr(), &mut p), MC_ERR_OPEN);
        assert!(last_error().contains("nope"), "{}", last_error());
        assert_eq!(mc_predictor_open(path.as_ptr(), &mut p), MC_OK);
        let (mut m, mut e, mut k, mut h) = (0, 0, 0, 0);
        assert_eq!(mc_predictor_shape(p, &mut m, &mut e, &mut k, &mut h), MC_OK);
        assert_eq!((m, e, k, h), (4, 8, 2, 2));
        assert_eq!(
            mc_predictor_shape(p, &mut m, std::ptr::null_mut(), &mut k, &mut h),
            MC_ERR_NULL
        );
        let mut s = std::ptr::null_mut();
        assert_eq!(mc_session_new(p, &mut s), MC_OK);
        let mut out = vec![0u16; 4 * 8];
        assert_eq!(
            mc_session_predict_next(s, 5, 0, out.as_mut_ptr()),
            MC_ERR_ARG
        );
        assert_eq!(
            mc_session_predict_next(s, 5, 9, out.as_mut_ptr()),
            MC_ERR_ARG
        );
        assert!(last_error().contains("budget 9"), "{}", last_error());
        assert_eq!(
            mc_session_predict_next(s, 5, 2, std::ptr::null_mut()),
            MC_ERR_NULL
        );
        assert_eq!(mc_session_predict_next(s, 5, 2, out.as_mut_ptr()), MC_OK);
        // An expert id out of range, a known-layer count out of range, a null session.
        let bad = [1u16, 2, 99, 3, 0, 1, 2, 3];
        assert_eq!(mc_session_observe(s, 5, bad.as_ptr()), MC_ERR_ARG);
        assert!(last_error().contains("expert 99"), "{}", last_error());
        assert_eq!(
            mc_session_predict_lookahead(s, 5, 4, bad.as_ptr(), 2, out.as_mut_ptr()),
            MC_ERR_ARG
        );
        assert_eq!(
            mc_session_observe(std::ptr::null_mut(), 5, bad.as_ptr()),
            MC_ERR_NULL
        );
        let good = [1u16, 2, 3, 4, 0, 1, 2, 3];
        assert_eq!(mc_session_observe(s, 5, good.as_ptr()), MC_OK);
        // Without --token-dropout there is no forecast before the id: refused by name.
        assert_eq!(
            mc_session_predict_next_unknown(s, 2, out.as_mut_ptr()),
            MC_ERR_PREDICT
        );
        assert!(last_error().contains("--token-dropout"), "{}", last_error());
        mc_session_free(s);
        mc_predictor_free(p);
        mc_session_free(std::ptr::null_mut());
        mc_predictor_free(std::ptr::null_mut());
    }
}

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

#[test]
fn a_traces_router_inputs_reach_c_per_sequence_token_and_layer() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("inputs.jsonl");
    let meta = r#"{"meta": {"model": "m", "n_layers": 2, "moe_layers": [0, 1], "n_experts": 8, "top_k": 2, "channels": [{"name": "router_inputs", "dtype": "f16", "width": 3}]}}"#;
    // Token `pos` of sequence `s` at layer `l` reads [s, pos, l + 0.5] (exact in f16);
    // sequence "s1" is stored first.
    let line = |s: u32, pos: u32| {
        let x = |l: u32| format!("[{s}, {pos}, {}]", l as f32 + 0.5);
        format!(
            r#"{{"seq": "s{s}", "pos": {pos}, "phase": "decode", "token": {pos}, "experts": [[1, 2], [3, 4]], "router_inputs": [{}, {}]}}"#,
            x(0),
            x(1)
        )
    };
    let lines = [line(1, 0), line(1, 1), line(0, 0), line(0, 1), line(0, 2)];
    std::fs::write(&jsonl, format!("{meta}\n{}\n", lines.join("\n"))).unwrap();
    let c_jsonl = CString::new(jsonl.to_str().unwrap()).unwrap();
    // SAFETY: each pointer below is either live or null on purpose; `out` holds the
    // lengths passed.
    unsafe {
        let mut t = std::ptr::null_mut();
        assert_eq!(
            mc_trace_open(c_jsonl.as_ptr(), &mut t),
            MC_OK,
            "{}",
            last_error()
        );
        let mut dim = 0u32;
        assert_eq!(mc_trace_router_input_dim(t, &mut dim), MC_OK);
        assert_eq!(dim, 3);
        let mut out = [0f32; 3];
        for s in 0..2u32 {
            let (tokens, _) = trace_sequence(t, s, 4);
            for (pos, &token) in tokens.iter().enumerate() {
                for l in 0..2u32 {
                    assert_eq!(
                        mc_trace_router_input(t, s, pos as u32, l, out.as_mut_ptr(), 3),
                        MC_OK
                    );
                    // the trace's first sequence is "s1" (trace order); token ids are positions
                    let name = if s == 0 { 1.0 } else { 0.0 };
                    assert_eq!(
                        out,
                        [name, token as f32, l as f32 + 0.5],
                        "sequence {s}, token {pos}, layer {l}"
                    );
                }
            }
        }
        assert_refused(
            mc_trace_router_input(t, 1, 3, 0, out.as_mut_ptr(), 3),
            MC_ERR_ARG,
            "token 3, MoE layer 0 is outside sequence 1's 3 tokens x 2 layers",
        );
        assert_eq!(
            mc_trace_router_input(t, 0, 0, 2, out.as_mut_ptr(), 3),
            MC_ERR_ARG
        );
        assert_refused(
            mc_trace_router_input(t, 2, 0, 0, out.as_mut_ptr(), 3),
            MC_ERR_ARG,
            "sequence 2 is outside 0..2",
        );
        assert_refused(
            mc_trace_router_input(t, 0, 0, 0, out.as_mut_ptr(), 2),
            MC_ERR_ARG,
            "3 wide",
        );
        assert_eq!(
            mc_trace_router_input(t, 0, 0, 0, std::ptr::null_mut(), 3),
            MC_ERR_NULL
        );
        mc_trace_free(t);
        let (path, _) = synthetic_trace(dir.path());
        let c_path = CString::new(path.to_str().unwrap()).unwrap();
        assert_eq!(mc_trace_open(c_path.as_ptr(), &mut t), MC_OK);
        assert_eq!(mc_trace_router_input_dim(t, &mut dim), MC_OK);
        assert_eq!(dim, 0);
        assert_refused(
            mc_trace_router_input(t, 0, 0, 0, out.as_mut_ptr(), 0),
            MC_ERR_ARG,
            "records no router inputs",
        );
        mc_trace_free(t);
    }
}

#[test]
fn a_trace_through_the_c_abi_is_its_recorded_routing_in_position_order() {
    let dir = tempfile::tempdir().unwrap();
    let (path, trace) = synthetic_trace(dir.path());
    let view = trace.view();
    let width = 4 * 2;
    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: each pointer below is either live or null on purpose; the sequences' arrays
    // hold the lengths the library reports while the trace lives.
    unsafe {
        let mut t = std::ptr::null_mut();
        assert_eq!(mc_trace_open(c_path.as_ptr(), &mut t), MC_OK);
        let (mut m, mut e, mut k, mut n) = (0, 0, 0, 0);
        assert_eq!(mc_trace_shape(t, &mut m, &mut e, &mut k, &mut n), MC_OK);
        assert_eq!((m, e, k, n), (4, 8, 2, 12));
        let mut seen = 0;
        for s in 0..n {
            let (tokens, experts) = trace_sequence(t, s, width);
            let len = tokens.len();
            let mut rows: Vec<usize> = (0..view.n_tokens()).filter(|&r| view.seq[r] == s).collect();
            rows.sort_by_key(|&r| view.pos[r]);
            assert_eq!(rows.len(), len, "sequence {s}");
            for (i, &r) in rows.iter().enumerate() {
                assert_eq!(tokens[i], view.token[r], "sequence {s}, token {i}");
                let recorded = &view.experts[r * width..(r + 1) * width];
                assert_eq!(&experts[i * width..(i + 1) * width], recorded);
            }
            seen += len;
        }
        assert_eq!(seen, view.n_tokens());
        let (mut len, mut tokens, mut experts) = (0u32, std::ptr::null(), std::ptr::null());
        assert_refused(
            mc_trace_sequence(t, n, &mut len, &mut tokens, &mut experts),
            MC_ERR_ARG,
            "sequence 12 is outside 0..12",
        );
        assert_eq!(
            mc_trace_sequence(t, 0, &mut len, std::ptr::null_mut(), &mut experts),
            MC_ERR_NULL
        );
        mc_trace_free(t);
        mc_trace_free(std::ptr::null_mut());
        // A token without its second layer's routing: the sequence is cut before it.
        let jsonl = dir.path().join("cut.jsonl");
        let meta = r#"{"meta": {"model": "m", "n_layers": 2, "moe_layers": [0, 1], "n_experts": 8, "top_k": 2}}"#;
        let line = |pos: u32, second: &str| {
            let e = format!("[[{pos}, 7], {second}]");
            format!(
                r#"{{"seq": "a", "pos": {pos}, "phase": "decode", "token": {}, "experts": {e}}}"#,
                10 + pos
            )
        };
        let lines = [
            line(0, "[1, 2]"),
            line(1, "[3, 4]"),
            line(2, "[1, 2]"),
            line(3, "null"),
            line(4, "[1, 2]"),
        ];
        std::fs::write(&jsonl, format!("{meta}\n{}\n", lines.join("\n"))).unwrap();
        let c_jsonl = CString::new(jsonl.to_str().unwrap()).unwrap();
        assert_eq!(
            mc_trace_open(c_jsonl.as_ptr(), &mut t),
            MC_OK,
            "{}",
            last_error()
        );
        assert_eq!(
            mc_trace_sequence(t, 0, &mut len, &mut tokens, &mut experts),
            MC_OK
        );
        assert_eq!(
            std::slice::from_raw_parts(tokens, len as usize),
            [10, 11, 12]
        );
        let routed = std::slice::from_raw_parts(experts, len as usize * 4);
        assert_eq!(routed, [0, 7, 1, 2, 1, 7, 3, 4, 2, 7, 1, 2]);
        mc_trace_free(t);
        let missing = CString::new(dir.path().join("none.mctrace").to_str().unwrap()).unwrap();
        assert_refused(
            mc_trace_open(missing.as_ptr(), &mut t),
            MC_ERR_OPEN,
            "none.mctrace",
        );
        assert_eq!(mc_trace_open(std::ptr::null(), &mut t), MC_ERR_NULL);
    }
}
