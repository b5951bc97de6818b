//! Importers of the routing serving and training engines emit (vLLM, SGLang,
//! Megatron-LM), on fixtures in the engines' exact layouts written by
//! `tools/engine_fixtures.py` from a known routing (`expected.json`).

use std::path::{Path, PathBuf};

use datasets::import::{import, ImportFormat, ImportOptions};
use datasets::RoutingTrace;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/engines")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

fn opts() -> ImportOptions {
    ImportOptions {
        n_experts: Some(16),
        top_k: Some(2),
        ..ImportOptions::default()
    }
}

/// A JSON list of bf16 bit patterns as f32 values.
fn bf16_values(bits: &Value) -> Vec<f32> {
    bits.as_array()
        .unwrap()
        .iter()
        .map(|b| half::bf16::from_bits(b.as_u64().unwrap() as u16).to_f32())
        .collect()
}

/// Checks every sequence of `trace` named in `expected.json` against its routing.
fn check(trace: &RoutingTrace, names: &[&str]) {
    let exp = expected();
    let view = trace.view();
    assert_eq!(view.meta.n_moe(), 3);
    assert_eq!((view.meta.n_experts, view.meta.top_k), (16, 2));
    for (name, range) in view.seq_names.iter().zip(view.sequence_ranges()) {
        if !names.contains(&name.as_str()) {
            continue;
        }
        let e = &exp["sequences"][name.as_str()];
        let routing = e["routing"].as_array().unwrap();
        assert_eq!(range.len(), routing.len(), "{name}: tokens");
        for (i, t) in range.clone().enumerate() {
            for m in 0..3 {
                let want: Option<Vec<u16>> = routing[i].as_array().map(|layers| {
                    layers[m]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as u16)
                        .collect()
                });
                assert_eq!(
                    view.layer(t, m).map(<[u16]>::to_vec),
                    want,
                    "{name}: token {i}, MoE layer {m}"
                );
            }
            if let Some(tokens) = e["tokens"].as_array() {
                assert_eq!(
                    view.token[t] as u64,
                    tokens[i].as_u64().unwrap(),
                    "{name}: token id {i}"
                );
            }
            if let Some(p) = e["prompt_len"].as_u64() {
                assert_eq!(
                    view.phase[t],
                    u8::from(i as u64 >= p),
                    "{name}: phase of token {i}"
                );
            }
        }
    }
}

#[test]
fn vllm_responses_in_every_layout() {
    for (file, names) in [
        (
            "vllm_response.json",
            vec!["vllm_response#c0", "vllm_response#c1"],
        ),
        ("vllm_split.json", vec!["vllm_split"]),
        ("vllm_offline.npy", vec!["vllm_offline"]),
    ] {
        let path = fixtures().join(file);
        assert_eq!(
            ImportFormat::detect(&path).unwrap(),
            ImportFormat::Vllm,
            "{file}"
        );
        let imported = import(&[path], None, &opts()).unwrap();
        assert_eq!(imported.trace.seq_names, names, "{file}");
        check(&imported.trace, &names);
        // Every-layer arrays lose their all-zero dense layer 0; the split layout has
        // the MoE layers only.
        let want: Vec<u32> = if file == "vllm_split.json" {
            vec![0, 1, 2]
        } else {
            vec![1, 2, 3]
        };
        assert_eq!(imported.trace.meta.moe_layers, want, "{file}");
        assert!(
            imported.notes.iter().any(|n| n.contains("dense")) || file == "vllm_split.json",
            "{file}: {:?}",
            imported.notes
        );
    }
}

#[test]
fn moe_layers_number_a_moe_only_axis_and_pick_layers_of_a_full_one() {
    let with = |layers: &str| ImportOptions {
        moe_layers: Some(datasets::import::parse_layer_list(layers).unwrap()),
        ..opts()
    };
    // MoE-only axis (3 entries) numbered as the model's layers 1..=3.
    let split = fixtures().join("vllm_split.json");
    let t = import(std::slice::from_ref(&split), None, &with("1-3"))
        .unwrap()
        .trace;
    assert_eq!(
        (t.meta.moe_layers.clone(), t.meta.n_layers),
        (vec![1, 2, 3], 4)
    );
    check(&t, &["vllm_split"]);
    // Every-layer axis (4 entries): the list picks the MoE layers, no zero test needed.
    let full = fixtures().join("vllm_response.json");
    let t = import(std::slice::from_ref(&full), None, &with("1,2,3")).unwrap();
    assert_eq!(t.trace.meta.moe_layers, vec![1, 2, 3]);
    assert!(
        !t.notes.iter().any(|n| n.contains("dense")),
        "{:?}",
        t.notes
    );
    check(&t.trace, &["vllm_response#c0", "vllm_response#c1"]);
    // The response names its model.
    assert_eq!(t.trace.meta.model, "tiny");
    // A list that fits neither layout is refused with both counts.
    let err = import(&[full], None, &with("3-9")).unwrap_err().to_string();
    assert!(
        err.contains("vllm_response.json") && err.contains("layer axis has 4"),
        "{err}"
    );
    for bad in ["3-1", "1,1", "x", "", "2,1"] {
        assert!(datasets::import::parse_layer_list(bad).is_err(), "{bad}");
    }
    assert_eq!(
        datasets::import::parse_layer_list("0, 2-4,7").unwrap(),
        vec![0, 2, 3, 4, 7]
    );
}

#[test]
fn sglang_dump_ranks_merge_and_requests_are_rebuilt_from_positions() {
    let dir = fixtures().join("sglang_dump");
    assert_eq!(
        ImportFormat::detect(&dir).unwrap(),
        ImportFormat::SglangDump
    );
    let imported = import(std::slice::from_ref(&dir), None, &ImportOptions::default()).unwrap();
    let t = &imported.trace;
    assert!(
        imported
            .notes
            .iter()
            .any(|n| n.contains("10 records repeat another rank")),
        "{:?}",
        imported.notes
    );
    // Dense layer 0 dropped; physical replicas 16..19 mapped back to logical 0..3.
    assert_eq!(
        (t.meta.moe_layers.clone(), t.meta.n_layers),
        (vec![1, 2, 3], 4)
    );
    assert_eq!((t.meta.n_experts, t.meta.top_k), (16, 2));
    let exp = expected();
    let want = exp["sglang_dump"].as_object().unwrap();
    assert_eq!(t.seq_names.len(), want.len());
    let view = t.view();
    for (name, range) in view.seq_names.iter().zip(view.sequence_ranges()) {
        let e = &want[name.as_str()];
        let ints = |k: &str| -> Vec<u64> {
            e[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        };
        let positions: Vec<u64> = range.clone().map(|i| view.pos[i] as u64).collect();
        assert_eq!(positions, ints("positions"), "{name}");
        let tokens: Vec<u64> = range.clone().map(|i| view.token[i] as u64).collect();
        assert_eq!(tokens, ints("tokens"), "{name}");
        for (i, t) in range.clone().enumerate() {
            let phase = if e["phases"][i] == "decode" { 1 } else { 0 };
            assert_eq!(view.phase[t], phase, "{name}: phase of token {i}");
            for m in 0..3 {
                let ids: Vec<u16> = e["routing"][i][m]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u16)
                    .collect();
                assert_eq!(
                    view.layer(t, m).unwrap(),
                    &ids[..],
                    "{name}: token {i}, MoE layer {m}"
                );
            }
        }
    }
    // One rank's file alone gives the same trace without the twin note.
    let one = dir.join("expert_distribution_recorder_1700000000.5_0.pt");
    assert_eq!(
        ImportFormat::detect(&one).unwrap(),
        ImportFormat::SglangDump
    );
    let single = import(&[one], None, &ImportOptions::default()).unwrap();
    assert_eq!(single.trace.experts, t.experts);
    assert!(!single.notes.iter().any(|n| n.contains("twins")));
}

#[test]
fn bad_sglang_dumps_are_refused_by_name() {
    let fmt = Some(ImportFormat::SglangDump);
    let err = |path: PathBuf| {
        import(&[path], fmt, &ImportOptions::default())
            .unwrap_err()
            .to_string()
    };
    let e = err(fixtures().join("sglang_bad_physical.pt"));
    assert!(
        e.contains("sglang_bad_physical.pt")
            && e.contains("record 0")
            && e.contains("physical expert 25"),
        "{e}"
    );
    let e = err(fixtures().join("sglang_not_a_dump.pt"));
    assert!(
        e.contains("sglang_not_a_dump.pt") && e.contains("no 'records' list"),
        "{e}"
    );
    // A truncated archive.
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("sglang_dump/expert_distribution_recorder_1700000000.5_0.pt");
    let bytes = std::fs::read(src).unwrap();
    let cut = dir.path().join("expert_distribution_recorder_cut_0.pt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(cut);
    assert!(e.contains("expert_distribution_recorder_cut_0.pt"), "{e}");
}

#[test]
fn sglang_response_needs_top_k_and_imports_exactly() {
    let path = fixtures().join("sglang_response.json");
    assert_eq!(ImportFormat::detect(&path).unwrap(), ImportFormat::Sglang);
    let err = import(std::slice::from_ref(&path), None, &ImportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sglang_response.json") && err.contains("--top-k"),
        "{err}"
    );
    let imported = import(&[path], None, &opts()).unwrap();
    check(&imported.trace, &["sglang_response"]);
}

#[test]
fn megatron_ranks_merge_and_hidden_states_become_router_inputs() {
    let dir = fixtures().join("megatron");
    assert_eq!(ImportFormat::detect(&dir).unwrap(), ImportFormat::Megatron);
    let imported = import(&[dir], None, &opts()).unwrap();
    assert!(
        imported.notes.iter().any(|n| n.contains("twin")),
        "{:?}",
        imported.notes
    );
    let t = &imported.trace;
    assert_eq!(t.seq_names, ["rank0/step1/mb0"]);
    assert!(!t.meta.ranked, "hook-path ids are sorted");
    let mut renamed = t.clone();
    renamed.seq_names = vec!["megatron".into()];
    check(&renamed, &["megatron"]);
    // Router logits: bf16 from the logits sidecar, exact in f32.
    let exp_logits = expected()["sequences"]["megatron"]["router_logits_bf16"].clone();
    for (tok, layers) in exp_logits.as_array().unwrap().iter().enumerate() {
        for (m, bits) in layers.as_array().unwrap().iter().enumerate() {
            let want = bf16_values(bits);
            assert_eq!(
                t.view().router_logits(tok, m).unwrap(),
                &want[..],
                "token {tok} layer {m}"
            );
        }
    }
    // Router inputs: bf16 from the sidecar, stored f16.
    let exp = expected();
    let rows = exp["sequences"]["megatron"]["router_inputs_bf16"]
        .as_array()
        .unwrap();
    let view = t.view();
    assert_eq!(view.meta.router_input_dim(), Some(8));
    for (tok, layers) in rows.iter().enumerate() {
        for (m, bits) in layers.as_array().unwrap().iter().enumerate() {
            let want = bf16_values(bits);
            let got = view.router_input_f32(tok, m).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-3 * w.abs().max(1.0),
                    "token {tok} layer {m}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn a_directory_of_responses_is_one_trace() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["vllm_response.json", "vllm_offline.npy"] {
        std::fs::copy(fixtures().join(f), dir.path().join(f)).unwrap();
    }
    let imported = import(&[dir.path().to_path_buf()], None, &opts()).unwrap();
    assert_eq!(
        imported.trace.seq_names,
        ["vllm_offline", "vllm_response#c0", "vllm_response#c1"]
    );
    check(
        &imported.trace,
        &["vllm_offline", "vllm_response#c0", "vllm_response#c1"],
    );
}

#[test]
fn malformed_engine_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let cases = [
        (
            write(
                "ragged.json",
                r#"{"choices":[{"routed_experts":[[[1,2],[3,4]],[[5,6]]]}]}"#,
            ),
            "token 1 has 1 layers",
        ),
        (
            write(
                "range.json",
                r#"{"choices":[{"routed_experts":[[[1,20],[3,4]]]}]}"#,
            ),
            "not below n_experts",
        ),
        (
            write(
                "twice.json",
                r#"{"choices":[{"routed_experts":[[[1,1],[3,4]]]}]}"#,
            ),
            "twice",
        ),
        (
            write(
                "partial.json",
                r#"{"choices":[{"routed_experts":[[[1,-1],[3,4]]]}]}"#,
            ),
            "beside computed ids",
        ),
        (
            write(
                "b64.json",
                r#"{"choices":[{"routed_experts":"!!notbase64"}]}"#,
            ),
            "bad base64",
        ),
        (
            write("none.json", r#"{"choices":[{"routed_experts":null}]}"#),
            "--enable-return-routed-experts",
        ),
    ];
    for (path, want) in cases {
        let err = import(
            std::slice::from_ref(&path),
            Some(ImportFormat::Vllm),
            &opts(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(path.file_name().unwrap().to_str().unwrap()) && err.contains(want),
            "{err}"
        );
    }
    // Megatron: a truncated sidecar and a ragged line.
    let m = dir.path().join("m");
    std::fs::create_dir(&m).unwrap();
    let src = fixtures().join("megatron");
    std::fs::copy(
        src.join("router_trace_rank0.jsonl"),
        m.join("router_trace_rank0.jsonl"),
    )
    .unwrap();
    std::fs::copy(src.join("logits_rank0.bin"), m.join("logits_rank0.bin")).unwrap();
    let side = std::fs::read(src.join("hidden_states_rank0.bin")).unwrap();
    std::fs::write(m.join("hidden_states_rank0.bin"), &side[..side.len() / 2]).unwrap();
    let err = import(std::slice::from_ref(&m), None, &opts())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("router_trace_rank0.jsonl:") && err.contains("truncated sidecar"),
        "{err}"
    );
    let text = std::fs::read_to_string(m.join("router_trace_rank0.jsonl")).unwrap();
    std::fs::write(
        m.join("router_trace_rank0.jsonl"),
        text.replacen("\"num_tokens\": 6", "\"num_tokens\": 5", 1),
    )
    .unwrap();
    let err = import(&[m], None, &opts()).unwrap_err().to_string();
    assert!(
        err.contains("router_trace_rank0.jsonl:1") && err.contains("num_tokens is 5"),
        "{err}"
    );
}
