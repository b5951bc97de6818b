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
