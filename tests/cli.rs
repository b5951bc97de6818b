//! The `moecast` binary end to end, traces and datasets: what a user types, what they get back.

mod common;

use common::*;
use std::path::{Path, PathBuf};

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
    // A moecast trace imports as itself, and the note names its storage form.
    let out = moecast(&["trace", "import", &one, "-o", &tmp(&dir, "again.jsonl")]);
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && note.contains("detected format a moecast trace (.mctrace)"),
        "{note}"
    );
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
