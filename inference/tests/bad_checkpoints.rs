//! Broken checkpoints fail with errors that name the file and the tensor.

use std::path::{Path, PathBuf};

use inference::tokenizer::TextTokenizer;
use inference::{Checkpoint, MoeModel};

fn copy_fixture(arch: &str) -> (tempfile::TempDir, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(arch);
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join(arch);
    std::fs::create_dir(&dst).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    (dir, dst)
}

fn load_err(dir: &Path) -> String {
    let device = inference::device::BackendKind::Flex.device();
    match Checkpoint::open(dir).and_then(|ck| MoeModel::load(&ck, &device)) {
        Ok(_) => panic!("broken checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn unknown_or_missing_architecture() {
    let (_t, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |v| v["model_type"] = "jamba".into());
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("'jamba' is not supported"),
        "{e}"
    );
    edit_config(&dir, |v| {
        v.as_object_mut().unwrap().remove("model_type");
        v["architectures"] = serde_json::json!(["SomethingElse"]);
    });
    let e = load_err(&dir);
    assert!(
        e.contains("neither model_type nor a known architectures"),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_file() {
    let (_t, dir) = copy_fixture("qwen3_moe");
    edit_config(&dir, |v| v["moe_intermediate_size"] = 9.into());
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors")
            && e.contains("experts.0.gate_proj.weight")
            && e.contains("expected [9,"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let (_t, dir) = copy_fixture("qwen3_moe");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.0.mlp.experts.3.up_proj.weight")
        .collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&path, out).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("missing tensor model.layers.0.mlp.experts.3.up_proj.weight"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_is_rejected() {
    let (_t, dir) = copy_fixture("qwen3_moe");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(&path, &bytes[..5]).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("bad safetensors"),
        "{e}"
    );
}

#[test]
fn missing_weights_and_sharded_index() {
    let (_t, dir) = copy_fixture("qwen3_moe_sharded_bf16");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    std::fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("no model.safetensors"), "{e}");
}

#[test]
fn tokenizer_mismatch_is_reported() {
    let (_t, dir) = copy_fixture("qwen3_moe");
    let tok = TextTokenizer::load(&dir).unwrap();
    let e = tok
        .encode("The router picks experts.", false, 10)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("tokenizer mismatch"),
        "{e}"
    );
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert!(TextTokenizer::load(&dir).is_err());
}

/// Logits of a fixed 40-token prompt.
fn logits(dir: &Path) -> Vec<f32> {
    let device = inference::device::BackendKind::Flex.device();
    let model = MoeModel::load(&Checkpoint::open(dir).unwrap(), &device).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 60).collect();
    let mut cache = model.new_cache();
    model
        .forward(&tokens, &mut cache, &mut inference::routing::NoObserver)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

#[test]
fn rope_scaling_is_honoured_on_the_llama_family_or_refused_by_name() {
    for arch in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"] {
        let (_t, dir) = copy_fixture(arch);
        let plain = logits(&dir);
        let theta = |v: &serde_json::Value| v["rope_parameters"]["rope_theta"].clone();
        // Scaling the positions changes the model's output (it was silently ignored).
        for scaling in [
            serde_json::json!({"rope_type": "linear", "factor": 4.0}),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        ] {
            edit_config(&dir, |v| {
                let mut p = scaling.clone();
                p["rope_theta"] = theta(v);
                v["rope_parameters"] = p;
            });
            let scaled = logits(&dir);
            let diff = plain
                .iter()
                .zip(&scaled)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff > 1e-3, "{arch} {scaling}: logits unchanged ({diff})");
        }
        // The older spelling (`rope_scaling` beside `rope_theta`) is read too.
        edit_config(&dir, |v| {
            let t = theta(v);
            v.as_object_mut().unwrap().remove("rope_parameters");
            v["rope_theta"] = t;
            v["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 4.0});
        });
        let legacy = logits(&dir);
        edit_config(&dir, |v| {
            v["rope_scaling"] = serde_json::Value::Null;
        });
        assert_eq!(
            logits(&dir),
            plain,
            "{arch}: rope_theta alone is plain RoPE"
        );
        assert_ne!(legacy, plain, "{arch}: rope_scaling ignored");
        edit_config(&dir, |v| {
            v["rope_scaling"] = serde_json::json!({"rope_type": "longrope", "factor": 4.0});
        });
        let e = load_err(&dir);
        assert!(
            e.contains("config.json") && e.contains("rope_scaling") && e.contains("'longrope'"),
            "{e}"
        );
    }
}

/// A model whose routed experts were dropped from memory, run without an expert source,
/// fails the forward with an error naming the layer and expert (no panic).
#[test]
fn offloaded_experts_without_a_source_are_an_error() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen3_moe");
    let ck = inference::Checkpoint::open(&dir).unwrap();
    let device = inference::device::BackendKind::from_test_env().device();
    let mut model = inference::MoeModel::load(&ck, &device).unwrap();
    for moe in model.sparse_layers_mut() {
        moe.offload_experts();
    }
    let err = model
        .forward(
            &[3, 4, 5],
            &mut model.new_cache(),
            &mut inference::routing::NoObserver,
        )
        .expect_err("no weights for the routed experts");
    let msg = err.to_string();
    assert!(
        msg.contains("layer 0") && msg.contains("offloaded"),
        "{msg}"
    );
}

/// A sliding window that transformers would apply is honoured (the logits change), and
/// settings it cannot run are refused naming the field.
#[test]
fn sliding_window_is_honoured_or_refused_by_name() {
    for arch in ["mixtral", "qwen3_moe"] {
        let (_t, dir) = copy_fixture(arch);
        let full = logits(&dir);
        edit_config(&dir, |v| {
            v["sliding_window"] = serde_json::json!(8);
            v["use_sliding_window"] = serde_json::json!(true);
        });
        assert_ne!(logits(&dir), full, "{arch}: sliding_window ignored");
        edit_config(&dir, |v| v["sliding_window"] = serde_json::json!(0));
        let e = load_err(&dir);
        assert!(
            e.contains("config.json") && e.contains("sliding_window 0"),
            "{e}"
        );
    }
    // Qwen: the window is the config's only with use_sliding_window; then an absent
    // window is 4096 (longer than the prompt) and Qwen3-MoE's `null` is none.
    let (_t, dir) = copy_fixture("qwen3_moe");
    let full = logits(&dir);
    edit_config(&dir, |v| v["sliding_window"] = serde_json::json!(8));
    assert_eq!(
        logits(&dir),
        full,
        "qwen3_moe: window without use_sliding_window"
    );
    edit_config(&dir, |v| {
        v["use_sliding_window"] = serde_json::json!(true);
        v["sliding_window"] = serde_json::Value::Null;
    });
    assert_eq!(logits(&dir), full, "qwen3_moe: sliding_window null");
    edit_config(&dir, |v| {
        v.as_object_mut().unwrap().remove("sliding_window");
    });
    assert_eq!(logits(&dir), full, "qwen3_moe: the default window, 4096");
    // Qwen2-MoE's layer_types: by default the even layers below max_window_layers; one
    // entry a layer, known types, sliding only with a window.
    let (_t, dir) = copy_fixture("qwen2_moe_sliding");
    let marked = logits(&dir);
    edit_config(&dir, |v| {
        v.as_object_mut().unwrap().remove("layer_types");
    });
    assert_eq!(logits(&dir), marked, "qwen2_moe: the default layer rule");
    edit_config(&dir, |v| v["max_window_layers"] = serde_json::json!(3));
    assert_ne!(logits(&dir), marked, "qwen2_moe: max_window_layers ignored");
    edit_config(&dir, |v| {
        v["layer_types"] = serde_json::json!(["sliding_attention"])
    });
    let e = load_err(&dir);
    assert!(e.contains("layer_types has 1 entries for 3 layers"), "{e}");
    edit_config(&dir, |v| {
        v["layer_types"] =
            serde_json::json!(["chunked_attention", "full_attention", "full_attention"])
    });
    let e = load_err(&dir);
    assert!(
        e.contains("unknown attention type 'chunked_attention'"),
        "{e}"
    );
    for (field, value) in [
        ("use_sliding_window", serde_json::json!(false)),
        ("sliding_window", serde_json::Value::Null),
    ] {
        edit_config(&dir, |v| {
            v["layer_types"] =
                serde_json::json!(["sliding_attention", "full_attention", "full_attention"]);
            v["use_sliding_window"] = serde_json::json!(true);
            v["sliding_window"] = serde_json::json!(5);
            v[field] = value;
        });
        let e = load_err(&dir);
        assert!(
            e.contains("layer 0 attends over a sliding window but there is none"),
            "{field}: {e}"
        );
    }
    // GPT-OSS: an absent window is 128; the same refusals.
    let (_t, dir) = copy_fixture("gpt_oss");
    let window_6 = logits(&dir);
    edit_config(&dir, |v| {
        v.as_object_mut().unwrap().remove("sliding_window");
    });
    let absent = logits(&dir);
    edit_config(&dir, |v| v["sliding_window"] = serde_json::json!(128));
    assert_eq!(logits(&dir), absent, "gpt_oss: the default window");
    assert_ne!(absent, window_6, "gpt_oss: sliding_window ignored");
    for (value, expected) in [
        (serde_json::json!(0), "sliding_window 0"),
        (
            serde_json::Value::Null,
            "attends over a sliding window but there is none",
        ),
    ] {
        edit_config(&dir, |v| v["sliding_window"] = value);
        let e = load_err(&dir);
        assert!(e.contains(expected), "{e}");
    }
    edit_config(&dir, |v| {
        v["sliding_window"] = serde_json::json!(6);
        v["layer_types"][1] = serde_json::json!("local_attention");
    });
    let e = load_err(&dir);
    assert!(
        e.contains("unknown attention type 'local_attention' (layer 1)"),
        "{e}"
    );
}

/// Fields a config may leave out take transformers' defaults for the family: the
/// fixtures, which `save_pretrained` wrote with those defaults spelled out, compute the
/// same logits without them.
#[test]
fn absent_fields_take_transformers_defaults() {
    for arch in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"] {
        let (_t, dir) = copy_fixture(arch);
        let spelled_out = logits(&dir);
        edit_config(&dir, |v| {
            let o = v.as_object_mut().unwrap();
            for field in ["rms_norm_eps", "rope_parameters", "rope_theta"] {
                o.remove(field);
            }
        });
        assert_eq!(logits(&dir), spelled_out, "{arch}");
    }
    // Qwen2-MoE's shared expert is 5632 wide by default: a config without the field
    // reads a shared expert of that width, not none.
    let (_t, dir) = copy_fixture("qwen2_moe");
    edit_config(&dir, |v| {
        v.as_object_mut()
            .unwrap()
            .remove("shared_expert_intermediate_size");
    });
    let e = load_err(&dir);
    assert!(
        e.contains("shared_expert.gate_proj") && e.contains("5632"),
        "{e}"
    );
}

/// What no family here computes is refused by the field's name.
#[test]
fn quantised_checkpoints_other_activations_and_unknown_top_k_methods_are_refused() {
    let (_t, dir) = copy_fixture("deepseek_v3");
    edit_config(&dir, |v| {
        v["quantization_config"] = serde_json::json!({"quant_method": "fp8", "fmt": "e4m3"})
    });
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("quantization_config (quant_method fp8)"),
        "{e}"
    );
    for arch in ["mixtral", "olmoe", "deepseek_v2"] {
        let (_t, dir) = copy_fixture(arch);
        edit_config(&dir, |v| v["hidden_act"] = serde_json::json!("gelu"));
        let e = load_err(&dir);
        assert!(e.contains("hidden_act 'gelu'"), "{arch}: {e}");
    }
    let (_t, dir) = copy_fixture("deepseek_v2");
    edit_config(&dir, |v| v["topk_method"] = serde_json::json!("noaux_tc"));
    let e = load_err(&dir);
    assert!(e.contains("topk_method 'noaux_tc'"), "{e}");
}
