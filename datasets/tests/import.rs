//! Importers on small hand-written fixtures of every format, and their error paths.

use std::path::{Path, PathBuf};

use datasets::import::{import, ImportFormat, ImportOptions};
use datasets::{Phase, RoutingTrace, TraceError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn import_file(path: &Path, fmt: Option<ImportFormat>) -> Result<RoutingTrace, TraceError> {
    import(&[path.to_path_buf()], fmt, &ImportOptions::default()).map(|i| i.trace)
}

fn experts(t: &RoutingTrace, tok: usize) -> Vec<Option<Vec<u16>>> {
    let v = t.view();
    (0..t.meta.n_moe())
        .map(|m| v.layer(tok, m).map(<[u16]>::to_vec))
        .collect()
}

#[test]
fn route_csv_groups_rows_into_tokens_and_sequences() {
    let t = import_file(&fixture("small.route.csv"), None).unwrap();
    assert_eq!(t.meta.model, "tiny-moe-test");
    assert_eq!(t.meta.architecture.as_deref(), Some("qwen3moe"));
    assert_eq!((t.meta.n_layers, t.meta.n_experts, t.meta.top_k), (3, 8, 2));
    assert_eq!(t.meta.expert_bytes, Some(vec![1000, 1000, 2000]));
    assert_eq!(t.seq_names, vec!["turn0-prefill", "turn0-decode"]);
    assert_eq!(t.pos, vec![0, 1, 2, 3, 4]);
    assert_eq!(t.phase, vec![0, 0, 0, 1, 1]);
    // Prefill rows are layer-major; the last layer is only computed for the last prompt token.
    assert_eq!(
        experts(&t, 0),
        vec![Some(vec![3, 5]), Some(vec![0, 7]), None]
    );
    assert_eq!(
        experts(&t, 2),
        vec![Some(vec![2, 3]), Some(vec![6, 7]), Some(vec![4, 1])]
    );
    assert_eq!(
        experts(&t, 4),
        vec![Some(vec![2, 3]), Some(vec![6, 1]), Some(vec![0, 4])]
    );
    let v = t.view();
    assert_eq!(v.layer_weights(2, 2), Some(&[0.9f32, 0.1][..]));
    assert_eq!(v.layer_weights(0, 2), None);
}

#[test]
fn warp_jsonl_is_one_unranked_sequence() {
    let t = import_file(&fixture("small.warp.jsonl"), None).unwrap();
    assert!(!t.meta.ranked);
    assert_eq!(t.meta.n_experts, 8, "largest id 7 + 1");
    assert_eq!(t.meta.moe_layers, vec![0, 1, 2]);
    assert_eq!(t.pos, vec![1, 2, 3]);
    assert_eq!(experts(&t, 1)[2], Some(vec![6, 7]));
    assert!(t.weights.is_none());
    let given = import(
        &[fixture("small.warp.jsonl")],
        None,
        &ImportOptions {
            n_experts: Some(64),
            model: Some("olmoe".into()),
            ..ImportOptions::default()
        },
    )
    .unwrap();
    assert_eq!(given.trace.meta.n_experts, 64);
    assert_eq!(given.trace.meta.model, "olmoe");
}

#[test]
fn router_trace_v2_uses_the_sidecar_spans_and_layer_map() {
    let imported = import(
        &[fixture("router_trace/trace.v2.json")],
        None,
        &ImportOptions::default(),
    )
    .unwrap();
    assert!(imported
        .notes
        .iter()
        .any(|n| n.contains("capture-metadata.json")));
    let t = imported.trace;
    assert_eq!(t.meta.model, "test/switch-tiny");
    assert_eq!(t.meta.moe_layers, vec![1, 3]);
    assert_eq!(t.meta.n_layers, 4);
    assert_eq!(t.seq_names, vec!["p1", "p2"]);
    assert_eq!(t.pos, vec![0, 1, 2, 0, 1]);
    assert_eq!(experts(&t, 3), vec![Some(vec![1]), Some(vec![1])]);
    assert!(t.phase.iter().all(|&p| p == Phase::Prefill.code()));
}

#[test]
fn router_trace_v2_without_sidecar_is_one_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("trace.v2.json");
    std::fs::copy(fixture("router_trace/trace.v2.json"), &p).unwrap();
    let t = import_file(&p, None).unwrap();
    assert_eq!(t.seq_names.len(), 1);
    assert_eq!(t.meta.moe_layers, vec![0, 1]);
}

#[test]
fn hook_jsonl_groups_layer_rows_and_ranks_by_probability() {
    let t = import_file(&fixture("small.hook.jsonl"), None).unwrap();
    assert_eq!(t.meta.moe_layers, vec![1, 3]);
    assert_eq!(t.meta.n_layers, 4);
    assert!(t.meta.ranked);
    assert_eq!(t.seq_names, vec!["7", "8"]);
    // token 0 of problem 7: layer 1 [4 (0.3), 2 (0.7)] -> ranked [2, 4]
    assert_eq!(experts(&t, 0), vec![Some(vec![2, 4]), Some(vec![0, 1])]);
    assert_eq!(experts(&t, 1), vec![Some(vec![2, 6]), Some(vec![5, 1])]);
    assert_eq!(t.view().layer_weights(1, 1), Some(&[0.8f32, 0.2][..]));
}

#[test]
fn interchange_jsonl_reads_nulls_and_unknown_tokens() {
    let t = import_file(&fixture("small.moecast.jsonl"), None).unwrap();
    assert_eq!(t.meta.moe_layers, vec![1, 3]);
    assert_eq!(experts(&t, 0), vec![Some(vec![3, 5]), None]);
    assert_eq!(t.token[2], datasets::UNKNOWN_TOKEN);
    assert_eq!(t.token[0], 17);
    assert_eq!(t.seq_names, vec!["a", "b"]);
}

#[test]
fn detection_picks_each_format() {
    let cases = [
        ("small.route.csv", ImportFormat::RouteCsv),
        ("small.warp.jsonl", ImportFormat::Warp),
        ("small.hook.jsonl", ImportFormat::HookJsonl),
        ("small.moecast.jsonl", ImportFormat::Jsonl),
        ("router_trace/trace.v2.json", ImportFormat::RouterTraceV2),
    ];
    for (file, want) in cases {
        assert_eq!(
            ImportFormat::detect(&fixture(file)).unwrap(),
            want,
            "{file}"
        );
    }
}

#[test]
fn several_files_concatenate_with_distinct_sequence_names() {
    let p = fixture("small.warp.jsonl");
    let t = import(&[p.clone(), p], None, &ImportOptions::default())
        .unwrap()
        .trace;
    assert_eq!(t.n_tokens(), 6);
    assert_eq!(t.seq_names, vec!["small.warp", "small.warp:small.warp"]);
}

/// Writes `content` to a temp file and imports it; returns the error text.
fn import_err(name: &str, content: &str, fmt: Option<ImportFormat>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, content).unwrap();
    let err = import_file(&p, fmt)
        .expect_err("malformed input must fail")
        .to_string();
    assert!(err.contains(name), "error must name the file: {err}");
    err
}

fn csv_with(rows: &str) -> String {
    let base = std::fs::read_to_string(fixture("small.route.csv")).unwrap();
    format!("{base}{rows}")
}

#[test]
fn malformed_route_csv_names_file_and_line() {
    // The fixture has 5 comment lines + header + 26 rows = 32 lines; appended rows start at 33.
    let e = import_err("bad.csv", &csv_with("0,1,5,0,0,x,0.5,0,1000\n"), None);
    assert!(e.contains(":33:") && e.contains("expert 'x'"), "{e}");
    let e = import_err("bad.csv", &csv_with("0,1,5,0,0,8,0.5,0,1000\n"), None);
    assert!(
        e.contains(":33:") && e.contains("not below n_expert = 8"),
        "{e}"
    );
    let e = import_err(
        "bad.csv",
        &csv_with("0,1,5,0,0,3,0.5,0,1000\n0,1,5,0,1,3,0.5,0,1000\n"),
        None,
    );
    assert!(e.contains(":34:") && e.contains("twice"), "{e}");
    let e = import_err("bad.csv", &csv_with("0,1,5,0,2,3,0.5,0,1000\n"), None);
    assert!(e.contains(":33:") && e.contains("wrong k"), "{e}");
    // A truncated file: the last token's layer has only one of its k = 2 rows.
    let e = import_err("bad.csv", &csv_with("0,1,5,0,0,3,0.5,0,1000\n"), None);
    assert!(
        e.contains(":33:") && e.contains("1 of n_expert_used = 2"),
        "{e}"
    );
    // A row cut in the middle.
    let e = import_err("bad.csv", &csv_with("0,1,5,0\n"), None);
    assert!(e.contains(":33:"), "{e}");
    let e = import_err("empty.csv", "", Some(ImportFormat::RouteCsv));
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn malformed_jsonl_formats_name_file_and_line() {
    let e = import_err(
        "w.jsonl",
        "{\"tok\": 1, \"layers\": [[0, 3], [2, 5]]}\n{\"tok\": 2, \"layers\": [[3, 3], [2, 5]]}\n",
        None,
    );
    assert!(e.contains(":2:") && e.contains("twice"), "{e}");
    let e = import_err(
        "w.jsonl",
        "{\"tok\": 1, \"layers\": [[0, 3], [2, 5]]}\n{\"tok\": 2, \"layers\": [[3], [2, 5]]}\n",
        None,
    );
    assert!(e.contains(":2:") && e.contains("top_k = 2"), "{e}");
    let e = import_err(
        "w.jsonl",
        "{\"tok\": 1, \"layers\": [[0, 3], [2, 5]]}\n{\"tok\": 2, \"lay",
        Some(ImportFormat::Warp),
    );
    assert!(e.contains(":2:"), "truncated line: {e}");
    let meta = "{\"meta\": {\"model\": \"m\", \"n_layers\": 2, \"moe_layers\": [0, 1], \"n_experts\": 4, \"top_k\": 2}}\n";
    let e = import_err("o.jsonl", &format!("{meta}{{\"seq\": \"a\", \"pos\": 0, \"phase\": \"decode\", \"token\": 1, \"experts\": [[0, 4], [1, 2]]}}\n"), None);
    assert!(
        e.contains(":2:") && e.contains("not below n_experts = 4"),
        "{e}"
    );
    let e = import_err("o.jsonl", &format!("{meta}{{\"seq\": \"a\", \"pos\": 0, \"phase\": \"think\", \"token\": 1, \"experts\": [[0, 1], [1, 2]]}}\n"), None);
    assert!(e.contains(":2:") && e.contains("think"), "{e}");
    let e = import_err("h.jsonl", "{\"layer\": 0, \"experts\": [1, 2], \"token_idx\": 0}\n{\"layer\": 0, \"experts\": [1, 2], \"token_idx\": 0}\n", None);
    assert!(e.contains(":2:") && e.contains("second row"), "{e}");
    let e = import_err("rt.json", "{\"tokens\": 3, \"layers\": 1, \"expertsPerLayer\": 4, \"topK\": 1, \"selections\": [[[0]], [[1]]]}", None);
    assert!(e.contains("\"tokens\" says 3"), "{e}");
    let e = import_err("rt.json", "{\"tokens\": 2, \"layers\": 1, \"expertsPerLayer\": 4, \"topK\": 1, \"selections\": [[[0]], [[1]]", Some(ImportFormat::RouterTraceV2));
    assert!(e.contains(":1:"), "truncated JSON: {e}");
    let e = import_err("empty.jsonl", "\n", None);
    assert!(e.contains("empty"), "{e}");
}
