//! `collect` reproduces the transformers routing recorded in the fixtures, streams
//! finished sequences, and leaves nothing behind on failure.

use std::path::{Path, PathBuf};

use collector::{collect, journal_path, CollectConfig, Prompt};
use inference::generate::Sampling;

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../inference/tests/fixtures/hf")
        .join(arch)
}

fn config(arch: &str, prompts: Vec<Prompt>, output: PathBuf) -> CollectConfig {
    CollectConfig {
        router_logits: false,
        model_dir: fixture(arch),
        prompts,
        max_new_tokens: 16,
        sampling: Sampling::Greedy,
        samples: 1,
        backend: Default::default(),
        add_special_tokens: false,
        router_inputs: false,
        output,
    }
}

#[test]
fn collected_trace_matches_transformers_routing() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("olmoe").join("expected.json")).unwrap(),
    )
    .unwrap();
    let case = &expected["prompts"][0];
    let text = case["text"].as_str().unwrap().to_string();
    let ids: Vec<u32> =
        serde_json::from_value(expected["prompts"][1]["input_ids"].clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.mctrace");
    let prompts = vec![
        Prompt::Text {
            name: "text".into(),
            text,
        },
        Prompt::Ids {
            name: "ids".into(),
            ids: ids.clone(),
        },
    ];
    let s = collect(&config("olmoe", prompts, out.clone())).unwrap();
    assert_eq!(s.sequences, 2);
    assert_eq!(s.decode_tokens, 32);
    assert!(!journal_path(&out).exists(), "journal removed on success");
    let trace = datasets::load_trace(&out).unwrap();
    assert_eq!(trace.meta.architecture.as_deref(), Some("olmoe"));
    assert_eq!(trace.meta.top_k, 2);
    assert_eq!(trace.seq_names, vec!["text", "ids"]);
    let v = trace.view();
    let n_prompt = case["input_ids"].as_array().unwrap().len();
    for t in 0..n_prompt {
        for m in 0..trace.meta.n_moe() {
            let want: Vec<u16> =
                serde_json::from_value(case["prefill"]["topk_ids"][t][m].clone()).unwrap();
            assert_eq!(v.layer(t, m).unwrap(), &want[..], "token {t} layer {m}");
        }
    }
    for (s, step) in case["decode"].as_array().unwrap().iter().enumerate() {
        let t = n_prompt + s;
        assert_eq!(v.phase[t], datasets::Phase::Decode.code());
        assert_eq!(v.token[t], step["input_id"].as_u64().unwrap() as u32);
        let want: Vec<u16> = serde_json::from_value(step["topk_ids"][0].clone()).unwrap();
        assert_eq!(v.layer(t, 0).unwrap(), &want[..], "decode step {s}");
    }
    let second = v.sequence_ranges()[1].clone();
    assert_eq!(&v.token[second.start..second.start + ids.len()], &ids[..]);
}

#[test]
fn seeded_sampling_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = vec![Prompt::Ids {
        name: "a".into(),
        ids: vec![5, 6, 7],
    }];
    let mut outs = Vec::new();
    for (i, seed) in [3u64, 3, 4].iter().enumerate() {
        let out = dir.path().join(format!("{i}.jsonl"));
        let mut cfg = config("mixtral", prompts.clone(), out.clone());
        cfg.sampling = Sampling::Temperature {
            temperature: 1.5,
            seed: *seed,
        };
        collect(&cfg).unwrap();
        outs.push(datasets::load_trace(&out).unwrap().token);
    }
    assert_eq!(outs[0], outs[1]);
    assert_ne!(outs[0], outs[2]);
}

#[test]
fn a_failing_prompt_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.mctrace");
    let prompts = vec![Prompt::Ids {
        name: "bad".into(),
        ids: vec![1, 100_000],
    }];
    let e = collect(&config("qwen3_moe", prompts, out.clone()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt 'bad'") && e.contains("100000"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn finished_sequences_survive_a_later_failure() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.mctrace");
    let prompts = vec![
        Prompt::Ids {
            name: "good".into(),
            ids: vec![5, 6, 7],
        },
        Prompt::Ids {
            name: "bad".into(),
            ids: vec![100_000],
        },
    ];
    assert!(collect(&config("qwen3_moe", prompts, out.clone())).is_err());
    assert!(!out.exists());
    let kept = datasets::load_trace(&journal_path(&out)).unwrap();
    assert_eq!(kept.seq_names, vec!["good"]);
    assert_eq!(kept.n_tokens(), 3 + 16);
}
