//! `tinymoe`: training a tiny Qwen3-MoE, exporting it, loading the export with the
//! runtime, and resuming from a checkpoint. Small shapes, so it runs in debug mode.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use inference::generate::{generate, Sampling};
use inference::layers::to_vec;
use inference::tokenizer::TextTokenizer;
use inference::{Checkpoint, MoeModel, RouteDecision, RoutingObserver};
use tinymoe::{data, export, state, train, TinyMoeConfig, TrainOptions};

/// A small corpus with structure worth learning: templated sentences in paragraphs,
/// and a `.jsonl` file of question / answer pairs.
fn write_corpus(dir: &Path) -> Vec<PathBuf> {
    let subjects = ["the cat", "a dog", "the bird", "my friend", "the teacher"];
    let verbs = ["sat on", "looked at", "ran to", "jumped over", "found"];
    let objects = ["the mat", "a tree", "the house", "a red ball", "the river"];
    let mut x: u64 = 12345;
    let mut next = |n: usize| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) % n as u64) as usize
    };
    let mut text = String::new();
    for _ in 0..120 {
        for _ in 0..(2 + next(3)) {
            text.push_str(&format!(
                "{} {} {}. ",
                subjects[next(5)],
                verbs[next(5)],
                objects[next(5)]
            ));
        }
        text.push_str("\n\n");
    }
    let txt = dir.join("stories.txt");
    std::fs::write(&txt, text).unwrap();
    let jsonl = dir.join("qa.jsonl");
    let mut f = std::fs::File::create(&jsonl).unwrap();
    for i in 0..40 {
        let (a, b) = (next(10), next(10));
        writeln!(
            f,
            r#"{{"id": {i}, "question": "What is {a} plus {b}?", "answer": "{a} plus {b} is {}."}}"#,
            a + b
        )
        .unwrap();
    }
    vec![txt, jsonl]
}

fn tiny_config() -> TinyMoeConfig {
    TinyMoeConfig {
        vocab_size: 300,
        hidden_size: 16,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 8,
        num_experts: 4,
        top_k: 2,
        moe_intermediate_size: 16,
        context: 32,
        ..TinyMoeConfig::default()
    }
}

fn tiny_options(corpus: Vec<PathBuf>, out: PathBuf, steps: usize) -> TrainOptions {
    TrainOptions {
        model: tiny_config(),
        steps,
        seed: 7,
        batch_size: 4,
        lr: 1e-2,
        warmup_steps: 2,
        val_every: 10,
        val_tokens: 256,
        checkpoint_every: 10,
        val_fraction: 0.1,
        progress: false,
        ..TrainOptions::new(corpus, out)
    }
}

#[derive(Default)]
struct Recorder {
    calls: Vec<(usize, usize, usize)>,
}

impl RoutingObserver for Recorder {
    fn on_routing(&mut self, layer: usize, first_pos: usize, decisions: &[RouteDecision]) {
        for d in decisions {
            assert_eq!(d.ids.len(), 2, "top-2 routing");
        }
        self.calls.push((layer, first_pos, decisions.len()));
    }
}

#[test]
fn trains_exports_and_the_runtime_loads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let out = tmp.path().join("tiny-moe");
    let s = train(&tiny_options(corpus, out.clone(), 20)).unwrap();
    assert!(s.finished);
    assert_eq!((s.start_step, s.end_step, s.losses.len()), (0, 20, 20));
    let first: f64 = s.losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = s.losses[17..].iter().sum::<f64>() / 3.0;
    assert!(
        last < first - 0.5,
        "loss should fall: first {first:.3}, last {last:.3} ({:?})",
        s.losses
    );
    let report = s.report.unwrap();
    assert!(report.final_val_loss < (300f64).ln(), "{report:?}");
    assert_eq!(report.expert_usage.len(), 2);
    for layer in &report.expert_usage {
        assert_eq!(layer.len(), 4);
        assert!((layer.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
    assert!(report.unigram_val_perplexity > 1.0);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    assert!(!out.join(".export-tmp").exists());
    let st_bytes = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len() as usize;
    let expect = tiny_config().bf16_bytes();
    assert!(
        st_bytes > expect && st_bytes < expect + 16_384,
        "{st_bytes} vs {expect}"
    );

    // The runtime loads the export; its logits equal the trained model's (bf16 weights).
    let device = Device::flex();
    let ck = Checkpoint::open(&out).unwrap();
    let rt = MoeModel::load(&ck, &device).unwrap();
    let shape = rt.shape();
    assert_eq!(
        (shape.model_type.as_str(), shape.n_layers),
        ("qwen3_moe", 2)
    );
    assert_eq!(
        (shape.n_experts, shape.top_k, shape.vocab_size),
        (4, 2, 300)
    );
    let tok = TextTokenizer::load(&out).unwrap();
    let ids = tok
        .encode("the cat sat on the mat. a dog", false, 300)
        .unwrap();
    assert!(ids.len() > 3);
    let got = to_vec(
        rt.forward(
            &ids,
            &mut rt.new_cache(),
            &mut inference::routing::NoObserver,
        )
        .unwrap(),
    );
    let trained = state::load_model(&out, &device).unwrap();
    let exact = to_vec(trained.clone().round_to_bf16().logits(&ids));
    let raw = to_vec(trained.logits(&ids));
    assert_eq!(got.len(), ids.len() * 300);
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(max_diff(&got, &exact) < 1e-4, "{}", max_diff(&got, &exact));
    assert!(max_diff(&got, &raw) < 1e-2, "{}", max_diff(&got, &raw));

    // Generation with the KV cache, as `moecast collect` runs it.
    let mut rec = Recorder::default();
    let g = generate(&rt, &ids, 6, &Sampling::Greedy, None, &mut rec).unwrap();
    assert_eq!(g.generated.len(), 6);
    assert_eq!(rec.calls.len(), 2 * 7, "prefill + 6 decode steps, 2 layers");
    assert_eq!(rec.calls[0], (0, 0, ids.len()));
    assert_eq!(rec.calls[2], (0, ids.len(), 1));
    tok.decode(&g.generated).unwrap();

    // A loaded training state holds its weights in memory, not in the record files.
    let loaded = state::load_model(&out, &device).unwrap();
    std::fs::remove_dir_all(state::state_dir(&out)).unwrap();
    assert_eq!(
        export::hf_tensors(&loaded).len(),
        1 + 2 * (9 + 3 * 4) + 1 + 1
    );
}

#[test]
fn resuming_continues_at_the_saved_step() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let a = tmp.path().join("interrupted");
    let mut opts = tiny_options(corpus.clone(), a.clone(), 8);
    opts.checkpoint_every = 3;
    opts.run_steps = Some(5);
    let s1 = train(&opts).unwrap();
    assert_eq!((s1.start_step, s1.end_step, s1.finished), (0, 5, false));
    assert!(
        !a.join("config.json").exists(),
        "no export before the last step"
    );
    let saved = state::load_state(&a).unwrap().unwrap();
    assert_eq!(saved.step, 5);
    opts.run_steps = None;
    let s2 = train(&opts).unwrap();
    assert_eq!((s2.start_step, s2.end_step, s2.finished), (5, 8, true));
    assert!(a.join("model.safetensors").exists());

    // The same run without interruption ends with the same losses and weights.
    let b = tmp.path().join("straight");
    let s3 = train(&tiny_options(corpus.clone(), b.clone(), 8)).unwrap();
    let resumed: Vec<f64> = s1.losses.iter().chain(&s2.losses).copied().collect();
    assert_eq!(resumed, s3.losses, "same seed, same losses, resumed or not");
    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("model.safetensors")).unwrap();
    assert!(
        wa == wb,
        "resumed and uninterrupted runs end with the same weights"
    );
    let records: Vec<String> = std::fs::read_dir(state::state_dir(&a))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bpk"))
        .collect();
    assert_eq!(
        records.len(),
        2,
        "only the last model and optimizer records: {records:?}"
    );

    // A different shape in the same folder is refused.
    let mut other = tiny_options(corpus, a, 8);
    other.model.num_experts = 8;
    let err = train(&other).unwrap_err().to_string();
    assert!(err.contains("different run"), "{err}");
}

#[test]
fn tokenizer_round_trips_and_split_is_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write_corpus(tmp.path());
    let docs = data::read_documents(&corpus[1]).unwrap();
    assert_eq!(docs.len(), 40);
    assert!(docs[0].starts_with("What is ") && docs[0].contains("\n"));
    let s1 = data::load_split(&corpus, 0.1, 3).unwrap();
    let s2 = data::load_split(&corpus, 0.1, 3).unwrap();
    let s3 = data::load_split(&corpus, 0.1, 4).unwrap();
    assert_eq!(s1.valid, s2.valid);
    assert_ne!(s1.valid, s3.valid);
    assert_eq!(s1.valid.len(), 16, "10% of 160 documents");
    let tok = data::train_tokenizer(&s1.train, 300).unwrap();
    assert_eq!(tok.get_vocab_size(true), 300);
    assert_eq!(data::eos_id(&tok).unwrap(), 0);
    for text in [
        "the cat sat on the mat.",
        "héllo wörld 🚀\n\tfn main() {}",
        "  x  ",
    ] {
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    }
    let again = data::train_tokenizer(&s1.train, 300).unwrap();
    assert_eq!(
        tok.to_string(false).unwrap(),
        again.to_string(false).unwrap(),
        "tokenizer training is deterministic"
    );
}

#[test]
fn default_shape_fits_16_mb_and_export_names_every_tensor() {
    let c = TinyMoeConfig::default();
    c.validate().unwrap();
    assert!(c.bf16_bytes() < 16_000_000, "{}", c.bf16_bytes());
    let model = tinymoe::TinyMoe::init(&tiny_config(), 1, &Device::flex());
    let tensors = export::hf_tensors(&model);
    let n: usize = tensors.iter().map(|(_, _, v)| v.len()).sum();
    assert_eq!(n, tiny_config().n_params());
    assert_eq!(tensors.len(), 1 + 2 * (9 + 3 * 4) + 1 + 1);
    let names: Vec<&str> = tensors.iter().map(|(n, _, _)| n.as_str()).collect();
    assert!(names.contains(&"model.layers.1.mlp.experts.3.down_proj.weight"));
    let (_, shape, _) = tensors
        .iter()
        .find(|(n, _, _)| n == "model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(shape, &vec![8, 16], "HF Linear weights are [out, in]");
    let mut bad = tiny_config();
    bad.num_kv_heads = 3;
    assert!(bad.validate().is_err());
}
