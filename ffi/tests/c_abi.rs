//! The C ABI against the Rust serving path: the committed header is what cbindgen makes
//! of the source; a C program built with the system compiler replays a trace through
//! the library and prints exactly the forecasts `OnlinePredictor` makes; a trace's
//! routing and router inputs reach C as recorded; bad arguments are error codes with a
//! message, never undefined behaviour. The blend, planner and guard are in `planning.rs`.

mod common;

use std::ffi::CString;
use std::path::Path;

use common::*;
use moecast::*;
use predictor::device::BackendKind;
use predictor::{LoadedPredictor, OnlinePredictor};

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
