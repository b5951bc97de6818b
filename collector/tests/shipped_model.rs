//! The shipped demo model (`checkpoints/tiny-moe`) is worth predicting: on held-out
//! prompts (`prompts/heldout.txt`, not used for training or the demo) it generates text,
//! every expert of every layer gets at least 1% of the routing, and adjacent-token
//! overlap is above the random baseline k/E and in the range real models show (0.2-0.5).
//! Its validation perplexity beats the unigram baseline (from its `training.json`).

use std::path::{Path, PathBuf};

use collector::{collect, read_prompts, CollectConfig};
use datasets::stats::compute;
use inference::generate::Sampling;
use inference::tokenizer::TextTokenizer;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn shipped_tiny_moe_routes_like_a_real_model() {
    let model = root().join("checkpoints/tiny-moe");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("heldout.mctrace");
    let cfg = CollectConfig {
        model_dir: model.clone(),
        prompts: read_prompts(&root().join("prompts/heldout.txt")).unwrap(),
        max_new_tokens: 32,
        sampling: Sampling::Greedy,
        samples: 1,
        backend: Default::default(),
        add_special_tokens: false,
        channels: Vec::new(),
        output: out.clone(),
    };
    let summary = collect(&cfg).unwrap();
    assert_eq!(summary.decode_tokens, 32 * cfg.prompts.len());
    let trace = datasets::load_trace(&out).unwrap();
    let view = trace.view();

    // It generates text.
    let tok = TextTokenizer::load(&model).unwrap();
    let first = view.sequence_ranges()[0].clone();
    let generated: Vec<u32> = first
        .clone()
        .filter(|&t| view.phase[t] == 1)
        .map(|t| view.token[t])
        .collect();
    let text = tok.decode(&generated).unwrap();
    assert!(
        text.chars().filter(|c| c.is_alphabetic()).count() > 20,
        "generated: {text:?}"
    );

    let k = trace.meta.top_k as f64;
    let e = trace.meta.n_experts as f64;
    let stats = compute(&view, &[trace.meta.top_k]);
    for l in &stats.layers {
        assert!(
            l.min_share >= 0.01,
            "layer {}: least used expert has {:.2}% of the routing",
            l.layer,
            100.0 * l.min_share
        );
    }
    let overlap = stats.overlap.unwrap();
    assert!(
        overlap > k / e,
        "overlap {overlap:.3} not above random {:.3}",
        k / e
    );
    assert!(
        (0.2..=0.5).contains(&overlap),
        "overlap {overlap:.3} outside 0.2-0.5"
    );

    let training: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("training.json")).unwrap())
            .unwrap();
    let find = |key: &str| -> f64 {
        training[key]
            .as_f64()
            .unwrap_or_else(|| panic!("training.json has no {key}"))
    };
    let (ppl, unigram) = (find("final_val_perplexity"), find("unigram_val_perplexity"));
    assert!(
        ppl < 0.5 * unigram,
        "validation perplexity {ppl:.1} vs unigram {unigram:.1}"
    );
}
