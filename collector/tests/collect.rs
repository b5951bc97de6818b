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
        model_dir: fixture(arch),
        prompts,
        max_new_tokens: 16,
        sampling: Sampling::Greedy,
        samples: 1,
        backend: Default::default(),
        add_special_tokens: false,
        channels: Vec::new(),
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

fn sampled(prompts: Vec<Prompt>, output: PathBuf, seed: u64) -> CollectConfig {
    let mut cfg = config("qwen3_moe", prompts, output);
    cfg.sampling = Sampling::Temperature {
        temperature: 1.5,
        seed,
    };
    cfg.samples = 2;
    cfg
}

fn id_prompts(names: &[&str]) -> Vec<Prompt> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| Prompt::Ids {
            name: n.to_string(),
            ids: vec![5 + i as u32, 6, 7],
        })
        .collect()
}

/// The journal of a run of prompts a, b, c (2 samples each, seed 9) that fails at its
/// fifth sequence (c#s0), keeping a#s0..b#s1.
fn interrupted_journal(out: &Path) -> PathBuf {
    let mut failing = id_prompts(&["a", "b", "c"]);
    failing[2] = Prompt::Ids {
        name: "c".into(),
        ids: vec![100_000],
    };
    assert!(collect(&sampled(failing, out.to_path_buf(), 9)).is_err());
    journal_path(out)
}

#[test]
fn an_interrupted_collection_resumes_to_the_uninterrupted_trace() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.jsonl");
    collect(&sampled(id_prompts(&["a", "b", "c"]), whole.clone(), 9)).unwrap();
    let want = std::fs::read_to_string(&whole).unwrap();

    let out = dir.path().join("t.jsonl");
    let journal = interrupted_journal(&out);
    let kept = datasets::load_trace(&journal).unwrap();
    assert_eq!(kept.seq_names, vec!["a#s0", "a#s1", "b#s0", "b#s1"]);

    let text = std::fs::read_to_string(&journal).unwrap();
    let b1 = text.find("\"seq\":\"b#s1\"").unwrap();
    let b1_second_line = b1 + text[b1..].find('\n').unwrap() + 1;
    let ranges = datasets::load_trace(&whole)
        .unwrap()
        .view()
        .sequence_ranges();
    // Cut it as a kill would: inside b#s1's lines, mid-line and at a line's end.
    for cut in [b1_second_line + 20, b1_second_line] {
        std::fs::write(&journal, &text.as_bytes()[..cut]).unwrap();
        let s = collect(&sampled(id_prompts(&["a", "b", "c"]), out.clone(), 9)).unwrap();
        assert_eq!(s.sequences, 6);
        // The cut b#s1 is collected again, the three before it are kept.
        assert_eq!(s.resumed_sequences, 3);
        assert_eq!(s.resumed_tokens, ranges[3].start);
        assert!(!journal.exists(), "journal removed on success");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
    }

    // A journal with nothing to keep (its only sequence may be cut) starts afresh,
    // whatever its settings.
    let a1 = text.find("\"seq\":\"a#s1\"").unwrap();
    let a1_line = text[..a1].rfind('\n').unwrap() + 1;
    std::fs::write(&journal, &text.as_bytes()[..a1_line]).unwrap();
    let mut greedy = config("qwen3_moe", id_prompts(&["a"]), out.clone());
    greedy.max_new_tokens = 4;
    let s = collect(&greedy).unwrap();
    assert_eq!((s.sequences, s.resumed_sequences), (1, 0));
}

#[test]
fn a_journal_of_other_settings_or_prompts_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.mctrace");
    let journal = interrupted_journal(&out);
    let before = std::fs::read(&journal).unwrap();

    let mut hidden = sampled(id_prompts(&["a", "b", "c"]), out.clone(), 9);
    hidden.channels = vec!["router_inputs".into()];
    let mut longer = sampled(id_prompts(&["a", "b", "c"]), out.clone(), 9);
    longer.max_new_tokens = 17;
    let mut one_sample = sampled(id_prompts(&["a", "b", "c"]), out.clone(), 9);
    one_sample.samples = 1;
    let mut renamed = id_prompts(&["a", "x", "c"]);
    renamed[0] = Prompt::Ids {
        name: "a".into(),
        ids: vec![9, 9],
    };
    let cases = [
        (
            sampled(id_prompts(&["a", "b", "c"]), out.clone(), 10),
            "--seed: 9 in the journal, 10 in this run",
        ),
        (
            hidden,
            "--hidden-states (channel router_inputs): absent in the journal, f16 x 24 in this run",
        ),
        (
            longer,
            "--max-new-tokens: 16 in the journal, 17 in this run",
        ),
        (one_sample, "--samples: 2 in the journal, 1 in this run"),
        (
            sampled(id_prompts(&["a", "b"]), out.clone(), 9),
            "prompts: 3 in the journal, 2 in this run",
        ),
        (
            sampled(renamed, out.clone(), 9),
            "sequence 'a#s0' was collected from another prompt",
        ),
        (
            sampled(id_prompts(&["x", "b", "c"]), out.clone(), 9),
            "its sequence 1 is 'a#s0' where this run's is 'x#s0'",
        ),
    ];
    for (cfg, want) in cases {
        let e = collect(&cfg).unwrap_err().to_string();
        assert!(
            e.contains(&journal.display().to_string()) && e.contains(want),
            "{e}"
        );
        assert!(e.contains("delete it to start afresh"), "{e}");
        assert_eq!(
            std::fs::read(&journal).unwrap(),
            before,
            "journal left as it was"
        );
    }

    // A journal written on another device (as a build with --features ndarray writes it).
    let text = String::from_utf8(before.clone()).unwrap();
    assert!(
        text.contains("\"device\":\"flex\""),
        "the journal records the device"
    );
    std::fs::write(
        &journal,
        text.replacen("\"device\":\"flex\"", "\"device\":\"ndarray\"", 1),
    )
    .unwrap();
    let e = collect(&sampled(id_prompts(&["a", "b", "c"]), out.clone(), 9))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--device: ndarray in the journal, flex in this run"),
        "{e}"
    );

    let mut lines: Vec<String> = String::from_utf8(before)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines[3] = "{\"seq\": oops}".into();
    std::fs::write(&journal, lines.join("\n") + "\n").unwrap();
    let e = collect(&sampled(id_prompts(&["a", "b", "c"]), out.clone(), 9))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 4:"), "{e}");
}
