//! Helpers shared by the CLI tests: run the `moecast` binary, find fixtures.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub fn moecast(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moecast"))
        .args(args)
        .output()
        .expect("run moecast")
}

/// Runs `moecast args`, requires success, and returns its stdout.
pub fn ok(args: &[&str]) -> String {
    ok_with_notes(args).0
}

/// Runs `moecast args`, requires success, and returns its stdout and its stderr (notes).
pub fn ok_with_notes(args: &[&str]) -> (String, String) {
    let out = moecast(args);
    let notes = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "moecast {args:?} failed:\n{notes}");
    (String::from_utf8(out.stdout).unwrap(), notes)
}

pub fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// Trains a one-epoch, one-block predictor on `trace` into `out`.
pub fn train_tiny(trace: &str, out: &str, extra: &[&str]) -> String {
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
        "--shards",
        "2",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

/// The timed hit rate of `prefetch` in a `simulate --json` file.
pub fn sim_hit_rate(json: &str, prefetch: &str) -> f64 {
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

pub fn tmp(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).display().to_string()
}

/// Collects the shipped tiny model's routing over `prompts` (a file under `prompts/`),
/// `max_new_tokens` per prompt, into `trace`; `extra` adds flags (`--hidden-states`).
pub fn collect_tiny(prompts: &str, max_new_tokens: &str, trace: &str, extra: &[&str]) {
    let model = fixture_path("checkpoints/tiny-moe");
    let prompts = fixture_path(&format!("prompts/{prompts}"));
    let mut args = vec![
        "collect",
        "--model",
        &model,
        "--prompts",
        &prompts,
        "--max-new-tokens",
        max_new_tokens,
        "-o",
        trace,
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

/// A path in the repository.
fn fixture_path(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .display()
        .to_string()
}
