//! The `moecast` binary end to end: what a user types, what they get back.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn moecast(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moecast"))
        .args(args)
        .output()
        .expect("run moecast")
}

fn ok(args: &[&str]) -> String {
    let out = moecast(args);
    assert!(
        out.status.success(),
        "moecast {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// Trains a one-epoch, one-block predictor on `trace` into `out`.
fn train_tiny(trace: &str, out: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "train",
        "--trace",
        trace,
        "-o",
        out,
        "--d-model",
        "16",
        "--layers",
        "1",
        "--heads",
        "2",
        "--epochs",
        "1",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

/// The timed hit rate of `prefetch` in a `simulate --json` file.
fn sim_hit_rate(json: &str, prefetch: &str) -> f64 {
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["timed"]["prefetch"] == prefetch)
        .unwrap()["hit_rate"]
        .as_f64()
        .unwrap()
}

fn tmp(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).display().to_string()
}

#[test]
fn import_convert_export_stats_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let bin = tmp(&dir, "t.mctrace");
    let said = ok(&["trace", "import", &fixture("small.route.csv"), "-o", &bin]);
    assert!(said.contains("imported 5 tokens in 2 sequences"), "{said}");
    let pq = tmp(&dir, "t.parquet");
    ok(&["trace", "convert", &bin, "-o", &pq]);
    let back = tmp(&dir, "back.mctrace");
    ok(&["trace", "convert", &pq, "-o", &back]);
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(&back).unwrap(),
        "binary -> parquet -> binary is byte-identical"
    );

    let jsonl = ok(&["trace", "export", &pq]);
    let lines: Vec<&str> = jsonl.lines().collect();
    assert_eq!(lines.len(), 6, "meta + 5 tokens");
    assert!(lines[0].starts_with("{\"meta\":"));
    assert!(
        lines[1].contains("\"experts\":[[3,5],[0,7],null]"),
        "{}",
        lines[1]
    );
    let out = tmp(&dir, "e.jsonl");
    ok(&["trace", "export", &bin, "-o", &out]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), jsonl);

    let json = ok(&["trace", "stats", &back, "--json", "--lru-capacity", "2,4"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!((v["overlap"].as_f64().unwrap() - 5.0 / 7.0).abs() < 1e-9);
    assert_eq!(v["lru_capacities"], serde_json::json!([2, 4]));
    assert_eq!(v["layers"].as_array().unwrap().len(), 3);

    let plots = dir.path().join("plots");
    let table = ok(&["trace", "stats", &bin, "--plot", plots.to_str().unwrap()]);
    assert!(table.contains("overlap      0.714"), "{table}");
    assert!(plots.join("lru_hit_rate.png").exists());

    let info = ok(&["trace", "info", &bin]);
    assert!(
        info.contains("\"architecture\": \"qwen3moe\"") && info.contains("experts"),
        "{info}"
    );
}

#[test]
fn malformed_input_fails_cleanly_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.route.csv");
    let mut text = std::fs::read_to_string(fixture("small.route.csv")).unwrap();
    text.push_str("0,1,5,0,0,99,0.5,0,1000\n");
    std::fs::write(&bad, text).unwrap();
    let out_path = tmp(&dir, "out.mctrace");
    let out = moecast(&["trace", "import", bad.to_str().unwrap(), "-o", &out_path]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.route.csv:33:") && err.contains("expert id 99"),
        "{err}"
    );
    assert!(!Path::new(&out_path).exists());
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(leftovers, vec![bad], "no temporary files left behind");

    let not_trace = moecast(&["trace", "stats", &fixture("small.route.csv")]);
    assert!(!not_trace.status.success());
    assert!(String::from_utf8_lossy(&not_trace.stderr).contains("trace import"));

    let cap = moecast(&[
        "trace",
        "stats",
        &fixture("small.moecast.jsonl"),
        "--lru-capacity",
        "9",
    ]);
    assert!(String::from_utf8_lossy(&cap.stderr).contains("--lru-capacity 9 must be in 1..=8"));
}

#[test]
fn explicit_format_and_multiple_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = tmp(&dir, "w.jsonl");
    let said = ok(&[
        "trace",
        "import",
        "--from",
        "warp",
        "--n-experts",
        "64",
        &fixture("small.warp.jsonl"),
        &fixture("small.warp.jsonl"),
        "-o",
        &out,
    ]);
    assert!(
        said.contains("6 tokens in 2 sequences") && said.contains("x 64 experts"),
        "{said}"
    );
    let wrong = moecast(&[
        "trace",
        "import",
        "--from",
        "route-csv",
        &fixture("small.warp.jsonl"),
        "-o",
        &out,
    ]);
    assert!(!wrong.status.success());
}

#[test]
fn synth_is_deterministic_per_seed() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp(&dir, "a.mctrace"),
        tmp(&dir, "b.mctrace"),
        tmp(&dir, "c.mctrace"),
    );
    ok(&[
        "trace",
        "synth",
        "-o",
        &a,
        "--seed",
        "5",
        "--sequences",
        "2",
    ]);
    ok(&[
        "trace",
        "synth",
        "-o",
        &b,
        "--seed",
        "5",
        "--sequences",
        "2",
    ]);
    ok(&[
        "trace",
        "synth",
        "-o",
        &c,
        "--seed",
        "6",
        "--sequences",
        "2",
    ]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
}

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
fn simulate_policies_and_prefetchers() {
    let dir = tempfile::tempdir().unwrap();
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
        "4",
    ]);
    let json = tmp(&dir, "sim.json");
    let table = ok(&[
        "simulate",
        "--trace",
        &trace,
        "--expert-bytes",
        "10000",
        "--cache",
        "10%,32",
        "--policy",
        "lru,next-use,belady",
        "--prefetch",
        "none,previous,activation,oracle",
        "--json",
        &json,
    ]);
    assert_eq!(
        table
            .lines()
            .filter(|l| ["lru", "next-use", "belady"].iter().any(|p| l.contains(p)))
            .count(),
        2 * 3 * 4,
        "{table}"
    );
    assert!(
        table.contains("untimed hit") && table.contains("10%=6") && table.contains("32=32"),
        "{table}"
    );
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 24);
    for r in rows.as_array().unwrap() {
        let (h, u) = (
            r["hit_rate"].as_f64().unwrap(),
            r["untimed_hit_rate"].as_f64().unwrap(),
        );
        assert!(
            (0.0..=1.0).contains(&h) && u + 1e-12 >= h,
            "untimed prefetch is never later: {r}"
        );
        // The settings it ran with, and where the hits are, layer by layer.
        assert_eq!(r["settings"]["expert_bytes"], 10000.0, "{r}");
        assert_eq!(r["settings"]["link_order"], "deadline", "{r}");
        let layers = r["timed"]["per_layer"].as_array().unwrap();
        let hits: u64 = layers.iter().map(|l| l["hits"].as_u64().unwrap()).sum();
        assert_eq!(layers.len(), 4, "{r}");
        assert_eq!(hits, r["timed"]["hits"].as_u64().unwrap(), "{r}");
    }
    let fail = |args: &[&str], want: &str| {
        let out = moecast(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    };
    fail(&["simulate", "--trace", &trace], "--expert-bytes");
    let sim = |extra: &[&str]| -> Vec<String> {
        ["simulate", "--trace", &trace, "--expert-bytes", "1"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    for (extra, want) in [
        (&["--prefetch", "learned"][..], "--predictor"),
        (&["--cache", "0%"][..], "cache size"),
        (&["--policy", "mru"][..], "mru"),
    ] {
        let args = sim(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fail(&args, want);
    }
}

#[test]
fn run_offloads_experts_with_learned_prefetch() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("checkpoints/tiny-moe").display().to_string();
    let prompts = root.join("prompts/demo.txt").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let trace = tmp(&dir, "t.mctrace");
    ok(&[
        "collect",
        "--model",
        &model,
        "--prompts",
        &prompts,
        "--max-new-tokens",
        "24",
        "-o",
        &trace,
    ]);
    let pred = tmp(&dir, "pred");
    ok(&[
        "train",
        "--trace",
        &trace,
        "--task",
        "next-token",
        "-o",
        &pred,
        "--d-model",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--context",
        "32",
        "--epochs",
        "2",
        "--quiet",
    ]);
    let json = tmp(&dir, "run.json");
    let said = ok(&[
        "run",
        "--model",
        &model,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "16",
        "--expert-cache",
        "20%",
        "--predictor",
        &pred,
        "--json",
        &json,
    ]);
    assert!(said.contains("identical to the engine's: yes"), "{said}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let r = &v["report"];
    let n = |k: &str| r[k].as_u64().unwrap();
    assert_eq!(n("decode_tokens"), 16);
    assert_eq!(n("accesses"), 16 * 6 * 2);
    assert_eq!(n("hits") + n("late") + n("misses"), n("accesses"));
    assert_eq!(n("capacity"), 19, "20% of 96 experts");
    assert!(
        n("prefetches") > 0 && n("useful_prefetches") <= n("prefetch_reads"),
        "{r}"
    );
    assert_eq!(v["generated"][0].as_array().unwrap().len(), 16);

    let fail = |args: &[&str], want: &str| {
        let out = moecast(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    };
    let base = ["run", "--model", &model, "--prompt", "x"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let other = tmp(&dir, "other.mctrace");
    ok(&[
        "trace",
        "synth",
        "-o",
        &other,
        "--layers",
        "3",
        "--experts",
        "8",
    ]);
    let other_pred = tmp(&dir, "other-pred");
    train_tiny(&other, &other_pred, &["--context", "8"]);
    for (extra, want) in [
        (&["--expert-cache", "0"][..], "cache size"),
        (&["--expert-cache", "150%"][..], "percentage"),
        (&["--policy", "belady"][..], "belady"),
        (&["--predictor", &other_pred][..], "the model has 6 x 16"),
        (&["--predictor", &tmp(&dir, "nope")][..], "predictor.json"),
    ] {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fail(&args, want);
    }
    fail(
        &["run", "--model", &tmp(&dir, "nope"), "--prompt", "x"],
        "nope",
    );
}

#[test]
fn router_inputs_feed_the_cross_layer_gate_in_eval_and_simulate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("checkpoints/tiny-moe").display().to_string();
    let prompts = root.join("prompts/heldout.txt").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (trace, plain) = (tmp(&dir, "h.mctrace"), tmp(&dir, "p.mctrace"));
    ok(&[
        "collect",
        "--model",
        &model,
        "--prompts",
        &prompts,
        "--max-new-tokens",
        "24",
        "--hidden-states",
        "-o",
        &trace,
    ]);
    ok(&[
        "collect",
        "--model",
        &model,
        "--prompts",
        &prompts,
        "--max-new-tokens",
        "4",
        "-o",
        &plain,
    ]);
    let json = tmp(&dir, "sim.json");
    let simulate = |prefetch: &str, timing: &[&str]| {
        let mut args = vec![
            "simulate",
            "--trace",
            &trace,
            "--model",
            &model,
            "--cache",
            "25%",
            "--prefetch",
            prefetch,
            "--bandwidth",
            "16",
            "--json",
            &json,
        ];
        args.extend_from_slice(timing);
        ok(&args)
    };
    let table = simulate("none,gate", &[]);
    assert!(table.contains(" gate "), "{table}");
    let hit = |p: &str| sim_hit_rate(&json, p);
    assert!(
        hit("gate") > hit("none") + 0.1,
        "gate {} none {}",
        hit("gate"),
        hit("none")
    );
    // The logit lens forecasts each next token's layer 0 after the token before it.
    simulate("none,lens", &[]);
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let layer0 = |p: &str| {
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["timed"]["prefetch"] == p);
        let l = &row.unwrap()["timed"]["per_layer"][0];
        let n = |k: &str| l[k].as_f64().unwrap();
        n("hits") / (n("hits") + n("late") + n("misses"))
    };
    assert!(
        layer0("lens") > layer0("none") + 0.2,
        "layer 0: lens {} none {}",
        layer0("lens"),
        layer0("none")
    );
    // With attention time before each layer's routing, the pre-attention gate prefetches
    // at the layer's start; alone and in union with the cross-layer gate.
    simulate(
        "none,pre-attention,gate+pre-attention",
        &[
            "--compute-us-per-layer",
            "20",
            "--attention-us-per-layer",
            "10",
        ],
    );
    assert!(
        hit("pre-attention") > hit("none") + 0.1,
        "{} vs {}",
        hit("pre-attention"),
        hit("none")
    );
    assert!(hit("gate+pre-attention") >= hit("pre-attention") - 0.02);
    let out = moecast(&["simulate", "--trace", &trace, "--prefetch", "pre-attention"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("need --model DIR"),
        "{err}"
    );

    let pred = tmp(&dir, "pred");
    ok(&[
        "train",
        "--trace",
        &trace,
        "--task",
        "lookahead",
        "--features",
        "hidden",
        "--token-dropout",
        "0.2",
        "-o",
        &pred,
        "--d-model",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--context",
        "32",
        "--epochs",
        "1",
        "--quiet",
    ]);
    let said = ok(&[
        "eval",
        "--predictor",
        &pred,
        "--trace",
        &trace,
        "--model",
        &model,
        "--quiet",
        "--json",
        &json,
    ]);
    assert!(said.contains("cross-layer gate"), "{said}");
    // Trained with token-id dropout: the forecast before the id is scored too.
    assert!(said.contains("next token, before its id"), "{said}");
    // The pre-attention gate forecasts one block ahead: the +1 group only.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let pre = report["methods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["method"] == "pre-attention gate")
        .expect("pre-attention gate scored");
    let sets = |g: usize| pre["groups"][g]["overall"]["sets"].as_u64().unwrap();
    assert!(sets(1) > 0 && sets(0) == 0 && sets(2) == 0, "{pre}");
    let f1 = pre["groups"][1]["overall"]["f1"].as_f64().unwrap();
    assert!(f1 > 0.3 && f1 <= 1.0, "pre-attention gate F1 {f1}");
    // The logit lens forecasts the first layer before the id: that group, layer 0 only,
    // and well above frequency there (the demo model's LM head knows the next token).
    let method = |name: &str| {
        report["methods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["method"] == name)
            .unwrap_or_else(|| panic!("{name} scored"))
            .clone()
    };
    let (lens, freq) = (method("lens (layer 0)"), method("frequency"));
    let before = report["groups"].as_array().unwrap().len() - 1;
    let layer0 =
        |m: &serde_json::Value| m["groups"][before]["per_layer"][0]["f1"].as_f64().unwrap();
    assert!(lens["groups"][before]["per_layer"][1].is_null(), "{lens}");
    assert_eq!(lens["groups"][0]["overall"]["sets"], 0, "{lens}");
    assert!(
        layer0(&lens) > layer0(&freq) + 0.1,
        "lens {} frequency {}",
        layer0(&lens),
        layer0(&freq)
    );
    // Refined by the predictor's per-token counts, the lens is scored beside it.
    let counted = method("lens + counts (layer 0)");
    assert!(layer0(&counted) > layer0(&freq) + 0.1, "{counted}");
    // The engine feeds the router input of each layer to such a predictor, and (trained
    // with token-id dropout) it forecasts each next token's layer 0 before the id.
    let said = ok(&[
        "run",
        "--model",
        &model,
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
        "--predictor",
        &pred,
        "--layer-forecasts",
    ]);
    assert!(
        said.contains("next token + layer lookahead")
            && said.contains("identical to the engine's: yes"),
        "{said}"
    );

    let fail = |args: &[&str], want: &str| {
        let out = moecast(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    };
    fail(
        &["simulate", "--trace", &trace, "--prefetch", "gate"],
        "--model",
    );
    fail(
        &[
            "simulate",
            "--trace",
            &plain,
            "--model",
            &model,
            "--prefetch",
            "gate",
        ],
        "--hidden-states",
    );
    fail(
        &["eval", "--predictor", &pred, "--trace", &plain],
        "--hidden-states",
    );
    fail(
        &[
            "train",
            "--trace",
            &plain,
            "--task",
            "lookahead",
            "--features",
            "hidden",
            "-o",
            &tmp(&dir, "x"),
        ],
        "--hidden-states",
    );
}

#[test]
fn import_into_a_partitioned_dataset_then_stats_and_simulate_stream_it() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (tmp(&dir, "a.jsonl"), tmp(&dir, "b.jsonl"));
    ok(&[
        "trace",
        "synth",
        "-o",
        &a,
        "--sequences",
        "12",
        "--tokens",
        "40",
        "--seed",
        "1",
    ]);
    ok(&[
        "trace",
        "synth",
        "-o",
        &b,
        "--sequences",
        "3",
        "--tokens",
        "40",
        "--seed",
        "2",
    ]);
    let root = format!("{}/", tmp(&dir, "ds"));
    let said = ok(&[
        "trace",
        "import",
        &a,
        &b,
        "--model",
        "org/m",
        "-o",
        &root,
        "--part-rows",
        "1000",
    ]);
    assert!(
        said.contains("imported 600 tokens in 15 sequences from 2 files -> 5 part(s)"),
        "{said}"
    );
    let partition = dir.path().join("ds/model=org%2Fm/source=moecast%20synth");
    assert!(partition.join("part-00004.parquet").is_file(), "{said}");
    let info = ok(&["trace", "info", &root]);
    assert!(info.contains("dataset: 5 parts, 4800 rows"), "{info}");

    // The same inputs as one file: identical statistics.
    let one = tmp(&dir, "one.mctrace");
    ok(&["trace", "import", &a, &b, "--model", "org/m", "-o", &one]);
    assert_eq!(
        ok(&["trace", "stats", &root, "--json"]),
        ok(&["trace", "stats", &one, "--json"])
    );
    let sim = ok(&[
        "simulate",
        "--trace",
        &root,
        "--expert-bytes",
        "1000",
        "--policy",
        "lru,belady",
        "--prefetch",
        "none,oracle",
    ]);
    assert!(
        sim.contains("5 parts, each replayed from a cold cache"),
        "{sim}"
    );
    assert!(sim.contains("600 tokens, 8 MoE layers"), "{sim}");
    assert_eq!(
        sim.lines().filter(|l| l.contains("10%=")).count(),
        4,
        "{sim}"
    );

    // Training and evaluation read the dataset like any trace (its memory-mapped shards).
    let ckpt = tmp(&dir, "pred");
    let said = train_tiny(&root, &ckpt, &[]);
    assert!(said.contains("trained 1 epochs"), "{said}");
    let card = std::fs::read_to_string(Path::new(&ckpt).join("predictor.json")).unwrap();
    assert!(card.contains("ds/"), "the card names the dataset: {card}");
    let report = ok(&["eval", "--predictor", &ckpt, "--split", "test", "--quiet"]);
    assert!(report.contains("F1"), "{report}");

    // A second model in the same root: reading the root is refused, the partition works.
    ok(&["trace", "import", &a, "-o", &root]);
    let out = moecast(&["trace", "stats", &root]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("open one model=... folder"), "{err}");
    ok(&["trace", "stats", &partition.display().to_string()]);
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
