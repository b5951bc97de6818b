//! The `moecast` binary end to end, trace replay: `run --replay` drives the engine on a
//! synthetic checkpoint of a recorded trace's shape, with its routing and router inputs.

mod common;

use common::*;

/// `run --replay`: a recorded trace through the engine on a synthetic checkpoint of its
/// shape, every routing forced to the trace; a trace of another shape is refused by name.
#[test]
fn run_replays_a_trace_on_a_synthetic_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = tmp(&dir, "ckpt");
    let made = synth_checkpoint(&ckpt, "4", "256");
    assert!(made.contains("experts of 12288 bytes"), "{made}");
    let trace = tmp(&dir, "t.mctrace");
    ok(&[
        "trace",
        "synth",
        "-o",
        &trace,
        "--layers",
        "4",
        "--experts",
        "16",
        "--top-k",
        "2",
        "--sequences",
        "2",
    ]);
    let json = tmp(&dir, "run.json");
    let (out, notes) = ok_with_notes(&[
        "run",
        "--model",
        &ckpt,
        "--replay",
        &trace,
        "--replay-tokens",
        "60",
        "--expert-cache",
        "25%",
        "--json",
        &json,
    ]);
    assert!(
        out.contains("replayed") && out.contains("(60 tokens)"),
        "{out}"
    );
    assert!(!notes.contains("could not be forced"), "{notes}");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let r = &run["report"];
    // Every decode step looked up the trace's 4 layers x top-2.
    let steps = r["decode_tokens"].as_u64().unwrap();
    assert!(steps >= 58, "{r}");
    assert_eq!(r["accesses"].as_u64().unwrap(), steps * 8, "{r}");
    assert_eq!(r["budget"], "-", "{r}");

    let other = tmp(&dir, "other.mctrace");
    ok(&[
        "trace",
        "synth",
        "-o",
        &other,
        "--layers",
        "4",
        "--experts",
        "8",
        "--top-k",
        "2",
    ]);
    let out = moecast(&["run", "--model", &ckpt, "--replay", &other]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("other.mctrace")
            && err.contains("top-2 of 8 experts"),
        "{err}"
    );
}

/// `run --replay` of a trace with router inputs gives the recorded ones to the
/// forecasters: a predictor reading the tiny model's 128-wide hidden states forecasts the
/// next layers on a 64-wide synthetic checkpoint; the logit lens, which reads them with
/// the checkpoint's own gate, is refused by name.
#[test]
fn run_replay_feeds_the_recorded_router_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let trace = tmp(&dir, "h.mctrace");
    collect_tiny("heldout.txt", "16", &trace, &["--hidden-states"]);
    let pred = tmp(&dir, "pred");
    train_tiny(
        &trace,
        &pred,
        &[
            "--task",
            "lookahead",
            "--features",
            "hidden",
            "--test-fraction",
            "0",
        ],
    );
    let ckpt = tmp(&dir, "ckpt");
    synth_checkpoint(&ckpt, "6", "512");
    let json = tmp(&dir, "run.json");
    let (out, notes) = ok_with_notes(&[
        "run",
        "--model",
        &ckpt,
        "--replay",
        &trace,
        "--replay-tokens",
        "40",
        "--expert-cache",
        "25%",
        "--predictor",
        &pred,
        "--layer-forecasts",
        "--prefetch-budget",
        "2",
        "--json",
        &json,
    ]);
    let said = format!("{out}{notes}");
    assert!(
        said.contains("recorded router inputs (width 128)"),
        "{said}"
    );
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let r = &run["report"];
    assert!(
        r["prefetch"].as_str().unwrap().contains("layer lookahead"),
        "{r}"
    );
    assert!(r["prefetches"].as_u64().unwrap() > 0, "{r}");

    let out = moecast(&["run", "--model", &ckpt, "--replay", &trace, "--lens"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("h.mctrace")
            && err.contains("--lens")
            && err.contains("width 128"),
        "{err}"
    );
}

/// Writes a synthetic checkpoint of `layers` MoE layers x 16 experts (top-2), hidden 64,
/// experts of 32, a `vocab`-token vocabulary, to `out`; returns what it said.
fn synth_checkpoint(out: &str, layers: &str, vocab: &str) -> String {
    ok(&[
        "checkpoint",
        "synth",
        "--layers",
        layers,
        "--experts",
        "16",
        "--top-k",
        "2",
        "--vocab",
        vocab,
        "--hidden",
        "64",
        "--moe-intermediate",
        "32",
        "-o",
        out,
    ])
}
