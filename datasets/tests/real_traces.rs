//! Real routing traces from `../shared/traces` (run by `make test-real`): every trace
//! imports, and its adjacent-token overlap matches the reference figure published in
//! `../shared/README.md` to 3 decimals. Ignored by default: the product must not need
//! `../shared`.

use std::path::{Path, PathBuf};

use datasets::import::{import, ImportOptions};
use datasets::stats::compute;

fn shared() -> PathBuf {
    std::env::var_os("MOECAST_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

/// Reads "Name 0.123" figures from the README's "Reference figures" paragraph.
fn reference(readme: &str, name: &str) -> f64 {
    let section = &readme[readme.find("Reference figures").expect("reference section")..];
    let at = section
        .find(&format!("{name} "))
        .unwrap_or_else(|| panic!("no figure for {name}"));
    let num: String = section[at + name.len() + 1..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse()
        .unwrap_or_else(|_| panic!("bad figure for {name}: {num}"))
}

fn overlap_of(files: &[PathBuf]) -> f64 {
    let t = import(files, None, &ImportOptions::default())
        .unwrap_or_else(|e| panic!("import failed: {e}"))
        .trace;
    t.validate().unwrap();
    compute(&t.view(), &[t.meta.top_k]).overlap.unwrap()
}

#[test]
#[ignore = "needs ../shared/traces; run with `make test-real`"]
fn real_traces_match_the_reference_overlaps() {
    let root = shared();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("../shared/README.md");
    let traces = root.join("traces");
    let cases = [
        (
            "Qwen",
            "qwen3-30b-a3b_gemma4-26b_gptoss-120b/qwen.route.csv",
        ),
        (
            "Gemma",
            "qwen3-30b-a3b_gemma4-26b_gptoss-120b/gemma.route.csv",
        ),
        (
            "gpt-oss",
            "qwen3-30b-a3b_gemma4-26b_gptoss-120b/gptoss.route.csv",
        ),
        ("OLMoE", "olmoe-1b-7b_kimi-linear-48b/trace_olmoe_299.jsonl"),
        ("Kimi", "olmoe-1b-7b_kimi-linear-48b/trace_kimi_300.jsonl"),
        ("Switch", "switch-base-8/router-trace.v2.json"),
    ];
    for (name, file) in cases {
        let got = overlap_of(&[traces.join(file)]);
        let want = reference(&readme, name);
        println!("{name:<8} overlap {got:.4} (reference {want})");
        assert!(
            (got - want).abs() < 5e-4,
            "{name}: {got:.4} vs reference {want}"
        );
    }
    // Switch without its sidecar: one sequence, reference "0.182 as one sequence".
    let dir = tempfile::tempdir().unwrap();
    let lone = dir.path().join("router-trace.v2.json");
    std::fs::copy(traces.join("switch-base-8/router-trace.v2.json"), &lone).unwrap();
    let got = overlap_of(&[lone]);
    let at = readme.find("as one sequence").expect("one-sequence figure");
    let want: f64 = readme[..at]
        .trim_end()
        .rsplit(['(', ' '])
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (got - want).abs() < 5e-4,
        "Switch as one sequence: {got:.4} vs {want}"
    );
}

#[test]
#[ignore = "needs ../shared/traces; run with `make test-real`"]
fn every_shared_trace_imports_and_round_trips() {
    let mut files = Vec::new();
    let mut stack = vec![shared().join("traces")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if !["LICENSE", "capture-metadata.json"]
                .contains(&p.file_name().unwrap().to_str().unwrap())
            {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 6, "found {files:?}");
    let dir = tempfile::tempdir().unwrap();
    for f in files {
        let t = import(std::slice::from_ref(&f), None, &ImportOptions::default())
            .unwrap()
            .trace;
        for ext in ["mctrace", "parquet"] {
            let out = dir.path().join(format!("t.{ext}"));
            datasets::save_trace(&t, &out, None).unwrap();
            let back = datasets::load_trace(&out).unwrap();
            assert_eq!(back.experts, t.experts, "{}", f.display());
            assert_eq!(back.seq_names, t.seq_names);
        }
    }
}
