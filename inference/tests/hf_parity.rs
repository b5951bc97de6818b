//! The runtime against Hugging Face transformers: tiny random checkpoints of every
//! supported architecture, with routing and logits recorded by `tools/hf_fixtures.py`.
//! Top-k expert ids must match exactly, weights and logits to 1e-4.

use std::path::{Path, PathBuf};

use inference::generate::{generate, Sampling};
use inference::tokenizer::TextTokenizer;
use inference::{Checkpoint, MoeModel, RouteDecision, RoutingObserver};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    moe_layers: Vec<usize>,
    prompts: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    text: Option<String>,
    #[serde(default)]
    add_special_tokens: bool,
    input_ids: Vec<u32>,
    prefill: Prefill,
    prefill_logits: Vec<f32>,
    decode: Vec<Step>,
    generated_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Prefill {
    /// [token][moe layer][k]
    topk_ids: Vec<Vec<Vec<u32>>>,
    topk_weights: Vec<Vec<Vec<f32>>>,
}

#[derive(Deserialize)]
struct Step {
    position: usize,
    input_id: u32,
    topk_ids: Vec<Vec<u32>>,
    topk_weights: Vec<Vec<f32>>,
    logits_top_ids: Vec<usize>,
    logits_top_values: Vec<f32>,
}

/// Records (position, layer) -> decision.
#[derive(Default)]
struct Recorder {
    seen: std::collections::BTreeMap<(usize, usize), RouteDecision>,
}

impl RoutingObserver for Recorder {
    fn on_routing(&mut self, layer: usize, first_pos: usize, decisions: &[RouteDecision]) {
        for (i, d) in decisions.iter().enumerate() {
            self.seen.insert((first_pos + i, layer), d.clone());
        }
    }
}

/// The backend under test: `MOECAST_TEST_DEVICE` (flex, ndarray, wgpu), flex by default.
fn test_backend() -> inference::device::BackendKind {
    inference::device::BackendKind::from_test_env()
}

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(arch)
}

/// The case's prompt and greedy decode, with every routing recorded.
fn greedy(model: &MoeModel, case: &Case) -> (inference::generate::Generation, Recorder) {
    let mut rec = Recorder::default();
    let gen = generate(
        model,
        &case.input_ids,
        case.decode.len(),
        &Sampling::Greedy,
        None,
        &mut rec,
    )
    .unwrap();
    (gen, rec)
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs {y}");
    }
}

fn check_arch(arch: &str) {
    let dir = fixture(arch);
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let device = test_backend().device();
    let model = MoeModel::load(&ck, &device).unwrap();
    assert_eq!(
        model.shape().moe_layers,
        expected.moe_layers,
        "{arch}: MoE layers"
    );
    let tok = TextTokenizer::load(&dir).unwrap();
    for case in &expected.prompts {
        let what = format!("{arch}/{}", case.name);
        if let Some(text) = &case.text {
            let ids = tok
                .encode(text, case.add_special_tokens, model.shape().vocab_size)
                .unwrap();
            assert_eq!(ids, case.input_ids, "{what}: tokenizer");
        }
        let (gen, rec) = greedy(&model, case);
        assert_eq!(gen.generated, case.generated_ids, "{what}: greedy tokens");
        close(
            &gen.step_logits[0],
            &case.prefill_logits,
            1e-4,
            &format!("{what} prefill logits"),
        );
        for (t, (ids, ws)) in case
            .prefill
            .topk_ids
            .iter()
            .zip(&case.prefill.topk_weights)
            .enumerate()
        {
            for (m, &layer) in expected.moe_layers.iter().enumerate() {
                let d = &rec.seen[&(t, layer)];
                assert_eq!(d.ids, ids[m], "{what}: prefill token {t} layer {layer} ids");
                close(
                    &d.weights,
                    &ws[m],
                    1e-4,
                    &format!("{what} prefill token {t} layer {layer} weights"),
                );
            }
        }
        for (s, step) in case.decode.iter().enumerate() {
            assert_eq!(gen.generated[s], step.input_id);
            for (m, &layer) in expected.moe_layers.iter().enumerate() {
                let d = &rec.seen[&(step.position, layer)];
                assert_eq!(
                    d.ids, step.topk_ids[m],
                    "{what}: decode step {s} layer {layer} ids"
                );
                close(
                    &d.weights,
                    &step.topk_weights[m],
                    1e-4,
                    &format!("{what} decode {s} layer {layer} weights"),
                );
            }
            let logits = &gen.step_logits[s + 1];
            let got: Vec<f32> = step.logits_top_ids.iter().map(|&i| logits[i]).collect();
            close(
                &got,
                &step.logits_top_values,
                1e-4,
                &format!("{what} decode {s} logits"),
            );
        }
        // Decode with the KV cache routes exactly like one full forward of the sequence.
        let mut full_seq = case.input_ids.clone();
        full_seq.extend(&gen.generated);
        let mut full = Recorder::default();
        model
            .forward(&full_seq, &mut model.new_cache(), &mut full)
            .unwrap();
        for (key, d) in &rec.seen {
            assert_eq!(
                full.seen[key].ids, d.ids,
                "{what}: cached vs full routing at {key:?}"
            );
        }
    }
}

#[test]
fn mixtral_matches_transformers() {
    check_arch("mixtral");
}

#[test]
fn qwen2_moe_matches_transformers() {
    check_arch("qwen2_moe");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_arch("qwen3_moe");
}

#[test]
fn qwen3_moe_sharded_bf16_matches_transformers() {
    check_arch("qwen3_moe_sharded_bf16");
}

#[test]
fn olmoe_matches_transformers() {
    check_arch("olmoe");
}

#[test]
fn deepseek_v2_matches_transformers() {
    check_arch("deepseek_v2");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check_arch("deepseek_v3");
}

#[test]
fn gpt_oss_matches_transformers() {
    check_arch("gpt_oss");
}

/// The Llama family with `rope_parameters` scaled as users scale them for long context
/// (linear interpolation and YaRN, factor 4; `tools/hf_archs.py`'s VARIANTS).
#[test]
fn llama_family_with_scaled_rope_matches_transformers() {
    for arch in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"] {
        for kind in ["linear", "yarn"] {
            check_arch(&format!("{arch}_rope_{kind}"));
        }
    }
}

/// The Llama-family members with a sliding window (5 positions, shorter than the
/// prompts; `tools/hf_archs.py`'s SLIDING): Mixtral and Qwen3-MoE on every layer,
/// Qwen2-MoE on the layers its `layer_types` marks.
#[test]
fn llama_family_with_sliding_window_matches_transformers() {
    for arch in ["mixtral", "qwen2_moe", "qwen3_moe"] {
        check_arch(&format!("{arch}_sliding"));
    }
}

/// Greedy decodes and prefill routings of fixture `name` that differ from its expected
/// ones once `edit` has changed its `config.json` (in a copy).
fn differences_with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> usize {
    let src = fixture(name);
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();

    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(src.join("expected.json")).unwrap()).unwrap();
    let model = MoeModel::load(
        &Checkpoint::open(tmp.path()).unwrap(),
        &test_backend().device(),
    )
    .unwrap();
    let mut differing = 0;
    for case in &expected.prompts {
        let (gen, rec) = greedy(&model, case);
        differing += usize::from(gen.generated != case.generated_ids);
        for (t, ids) in case.prefill.topk_ids.iter().enumerate() {
            for (m, &layer) in expected.moe_layers.iter().enumerate() {
                differing += usize::from(rec.seen[&(t, layer)].ids != ids[m]);
            }
        }
    }
    differing
}

/// The scaled fixtures exercise their scaling: the same checkpoint read with plain RoPE
/// (its `rope_parameters` reset to the default type) routes differently somewhere.
#[test]
fn scaled_rope_fixtures_differ_from_plain_rope() {
    for arch in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"] {
        for kind in ["linear", "yarn"] {
            let name = format!("{arch}_rope_{kind}");
            let differing = differences_with_config(&name, |cfg| {
                let theta = cfg["rope_parameters"]["rope_theta"].clone();
                cfg["rope_parameters"] =
                    serde_json::json!({"rope_type": "default", "rope_theta": theta});
            });
            assert!(
                differing > 0,
                "{name}: plain RoPE routes exactly like {kind} scaling"
            );
        }
    }
}

/// The sliding fixtures exercise their window: read with full attention on every layer,
/// the same checkpoint routes or decodes differently somewhere.
#[test]
fn sliding_window_fixtures_differ_from_full_attention() {
    for arch in ["mixtral", "qwen2_moe", "qwen3_moe"] {
        let name = format!("{arch}_sliding");
        let differing = differences_with_config(&name, |cfg| {
            cfg["sliding_window"] = serde_json::Value::Null;
            cfg["use_sliding_window"] = serde_json::Value::Bool(false);
            if let Some(types) = cfg["layer_types"].as_array_mut() {
                types.fill(serde_json::json!("full_attention"));
            }
        });
        assert!(
            differing > 0,
            "{name}: full attention routes exactly like the window"
        );
    }
}
