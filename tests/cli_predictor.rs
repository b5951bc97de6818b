//! The `moecast` binary end to end, predictors: train, eval, on synthetic and imported traces.

mod common;

use common::*;

#[test]
fn train_then_eval_a_predictor() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = (tmp(&dir, "train.mctrace"), tmp(&dir, "test.mctrace"));
    for (out, seed) in [(&train, "1"), (&test, "2")] {
        ok(&[
            "trace",
            "synth",
            "-o",
            out,
            "--layers",
            "3",
            "--experts",
            "8",
            "--top-k",
            "2",
            "--sequences",
            "12",
            "--tokens",
            "32",
            "--stickiness",
            "0.6",
            "--seed",
            seed,
        ]);
    }
    let ckpt = tmp(&dir, "pred");
    let train_args = [
        "train",
        "--shards",
        "2",
        "--trace",
        &train,
        "--task",
        "lookahead",
        "-o",
        &ckpt,
        "--d-model",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--context",
        "16",
        "--epochs",
        "2",
        "--quiet",
    ];
    let said = ok(&train_args);
    assert!(
        said.contains("best validation F1") && said.contains("+1 layer"),
        "{said}"
    );
    for f in [
        "predictor.json",
        "model.bpk",
        "baselines.safetensors",
        "train-state/state.json",
    ] {
        assert!(dir.path().join("pred").join(f).exists(), "{f}");
    }
    // Rerunning a finished run does not train again.
    let again = ok(&train_args);
    assert!(again.contains("trained 2 epochs"), "{again}");
    let json = tmp(&dir, "eval.json");
    let plots = tmp(&dir, "plots");
    let table = ok(&[
        "eval",
        "--predictor",
        &ckpt,
        "--trace",
        &test,
        "--json",
        &json,
        "--plot",
        &plots,
        "--quiet",
    ]);
    for m in [
        "predictor",
        "previous-token",
        "frequency",
        "co-activation",
        "recall@4",
        "macro-F1",
    ] {
        assert!(table.contains(m), "{m} missing:\n{table}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["task"], "lookahead");
    assert_eq!(
        report["groups"].as_array().unwrap().len(),
        3,
        "3 layers: next token, +1 and +2"
    );
    let f1 = report["methods"][0]["groups"][0]["overall"]["f1"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&f1));
    assert!(dir
        .path()
        .join("plots/f1_per_layer_lookahead__1_layer.png")
        .exists());

    // Mistakes a user makes get a message naming what is wrong.
    let out = moecast(&["eval", "--predictor", &tmp(&dir, "nope"), "--trace", &test]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("predictor.json"),
        "{err}"
    );
    let out = moecast(&[
        "train",
        "--trace",
        &train,
        "--task",
        "next-token",
        "--features",
        "hidden",
        "-o",
        &ckpt,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--task next-token has none"),
        "{err}"
    );
    let other = tmp(&dir, "other.mctrace");
    ok(&["trace", "synth", "-o", &other, "--layers", "4"]);
    let out = moecast(&["eval", "--predictor", &ckpt, "--trace", &other]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("other.mctrace") && err.contains("does not match"),
        "{err}"
    );
}

#[test]
fn an_imported_engine_trace_trains_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let ds = format!("{}/", tmp(&dir, "ds"));
    let said = ok(&[
        "trace",
        "import",
        &fixture("engines/sglang_dump"),
        "-o",
        &ds,
    ]);
    assert!(said.contains("imported 36 tokens in 6 sequences"), "{said}");
    let ckpt = tmp(&dir, "pred");
    train_tiny(
        &ds,
        &ckpt,
        &["--val-fraction", "0.2", "--test-fraction", "0.2"],
    );
    let report = ok(&["eval", "--predictor", &ckpt, "--split", "test", "--quiet"]);
    assert!(
        report.contains("next token (next-token, top-2 of 16, 1 sequences"),
        "{report}"
    );
}
