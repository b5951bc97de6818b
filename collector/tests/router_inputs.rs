//! `collect --hidden-states --router-logits --pre-attention-logits`: each MoE layer's router input and logits
//! are captured and stored beside the routing; applying the layer's gate to the stored
//! (f16) input reproduces the recorded top-k for every token and layer, and so do the
//! stored logits. They and the pre-attention logits survive conversion to Parquet and
//! JSONL and back.

use std::path::{Path, PathBuf};

use collector::{collect, CollectConfig, Prompt};
use datasets::{load_trace, save_trace, TraceFormat};
use inference::generate::Sampling;
use inference::layers::to_vec;
use inference::{Checkpoint, MoeModel};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn collect_with_inputs(model_dir: &Path, out: &Path) {
    let prompts = vec![
        Prompt::Text {
            name: "a".into(),
            text: "The cache holds the experts that".into(),
        },
        Prompt::Ids {
            name: "b".into(),
            ids: vec![5, 17, 42, 99, 7, 3],
        },
    ];
    collect(&CollectConfig {
        model_dir: model_dir.to_path_buf(),
        prompts,
        max_new_tokens: 12,
        sampling: Sampling::Greedy,
        samples: 1,
        backend: Default::default(),
        add_special_tokens: false,
        channels: vec![
            "router_inputs".into(),
            "router_logits".into(),
            "pre_attention_logits".into(),
        ],
        output: out.to_path_buf(),
    })
    .unwrap();
}

#[test]
fn the_gate_applied_to_the_stored_input_reproduces_the_routing() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = root().join("inference/tests/fixtures/hf");
    for model_dir in [
        root().join("checkpoints/tiny-moe"),
        fixtures.join("qwen3_moe"),
        fixtures.join("mixtral"),
        fixtures.join("deepseek_v3"),
    ] {
        let out = dir.path().join("t.mctrace");
        collect_with_inputs(&model_dir, &out);
        let trace = load_trace(&out).unwrap();
        let view = trace.view();
        let ck = Checkpoint::open(&model_dir).unwrap();
        let mut model = MoeModel::load(&ck, &Default::default()).unwrap();
        let shape = model.shape();
        assert_eq!(view.meta.router_input_dim(), Some(shape.hidden_size as u32));
        let gates: Vec<_> = model
            .sparse_layers_mut()
            .into_iter()
            .map(|moe| {
                (
                    to_vec(moe.router.weight.clone()),
                    moe.scoring.clone(),
                    moe.top_k,
                )
            })
            .collect();
        let (h, e) = (shape.hidden_size, shape.n_experts);
        let mut checked = 0;
        for t in 0..view.n_tokens() {
            for (m, (w, scoring, k)) in gates.iter().enumerate() {
                let ids = view.layer(t, m).expect("every layer computed");
                let x = view.router_input_f32(t, m).expect("router input recorded");
                // weight is stored transposed: [hidden, experts]
                let logits: Vec<f32> = (0..e)
                    .map(|j| (0..h).map(|i| x[i] * w[i * e + j]).sum())
                    .collect();
                let d = scoring.route(&logits, *k);
                let want: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
                assert_eq!(
                    d.ids,
                    want,
                    "{}: token {t}, MoE layer {m}",
                    model_dir.display()
                );
                // The recorded logits route exactly, and match the gate on the f16 input.
                let recorded = view.router_logits(t, m).expect("router logits recorded");
                assert_eq!(
                    scoring.route(recorded, *k).ids,
                    want,
                    "token {t}, MoE layer {m}"
                );
                for (a, b) in recorded.iter().zip(&logits) {
                    assert!((a - b).abs() < 1e-2 * a.abs().max(1.0), "logit {a} vs {b}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 18 * gates.len(), "{checked}");
    }
}

#[test]
fn router_inputs_survive_parquet_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("t.mctrace");
    collect_with_inputs(&root().join("inference/tests/fixtures/hf/qwen3_moe"), &bin);
    let trace = load_trace(&bin).unwrap();
    let names: Vec<&str> = trace
        .meta
        .channels
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["router_inputs", "router_logits", "pre_attention_logits"]
    );
    for (name, fmt) in [
        ("t.parquet", TraceFormat::Parquet),
        ("t.jsonl", TraceFormat::Jsonl),
    ] {
        let path = dir.path().join(name);
        save_trace(&trace, &path, Some(fmt)).unwrap();
        let back = load_trace(&path).unwrap();
        assert_eq!(back.channels, trace.channels, "{name}");
        assert_eq!(back.meta, trace.meta, "{name}");
        assert_eq!(back.experts, trace.experts, "{name}");
    }
    // A record whose input has the wrong width is refused with the line named.
    let jsonl = std::fs::read_to_string(dir.path().join("t.jsonl")).unwrap();
    let mut lines: Vec<String> = jsonl.lines().map(String::from).collect();
    let mut rec: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    rec["router_inputs"][0].as_array_mut().unwrap().pop();
    lines[2] = rec.to_string();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let err = load_trace(&bad).unwrap_err().to_string();
    assert!(
        err.contains("bad.jsonl:3:")
            && err.contains("MoE layer index 0: 23 'router_inputs' values, expected 24"),
        "{err}"
    );
}
