//! The pre-attention logits the runtime computes, recorded as a trace channel by
//! `collect --pre-attention-logits`, equal the gate's teacher-forced computation and let
//! `moecast simulate --prefetch pre-attention` run without the model.

use std::path::{Path, PathBuf};

use collector::{collect, CollectConfig, Prompt};
use datasets::channel::{ChannelSlice, PRE_ATTENTION_LOGITS};
use datasets::load_trace;
use inference::generate::Sampling;
use inference::{Checkpoint, MoeModel};
use offload::simulate::study::{run_study, StudySettings};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn settings(trace: &Path, model: Option<PathBuf>) -> StudySettings {
    StudySettings {
        trace: trace.to_path_buf(),
        parts: vec![trace.to_path_buf()],
        cache: vec!["25%".into()],
        sweep: false,
        policy: vec!["lru".into()],
        prefetch: vec!["pre-attention".into()],
        predictor: None,
        model,
        budget: vec!["2".into()],
        chunk_bytes: 1048576.0,
        horizon: 1,
        per_layer: false,
        bandwidth: 3.0,
        expert_bytes: None,
        compute_us_per_layer: 30.0,
        attention_us_per_layer: 30.0,
        deadline_order: true,
    }
}

#[test]
fn recorded_pre_attention_logits_match_the_gate_and_stand_in_for_the_model() {
    let model_dir = root().join("inference/tests/fixtures/hf/qwen3_moe");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.mctrace");
    let prompts = vec![
        Prompt::Ids {
            name: "a".into(),
            ids: vec![5, 17, 42, 99, 7, 3],
        },
        Prompt::Ids {
            name: "b".into(),
            ids: vec![11, 2, 64, 8],
        },
    ];
    collect(&CollectConfig {
        model_dir: model_dir.clone(),
        prompts,
        max_new_tokens: 10,
        sampling: Sampling::Greedy,
        samples: 1,
        backend: Default::default(),
        add_special_tokens: false,
        channels: vec![PRE_ATTENTION_LOGITS.into()],
        output: out.clone(),
    })
    .unwrap();
    let trace = load_trace(&out).unwrap();
    let view = trace.view();
    let Some(ChannelSlice::F32(recorded)) = view.channel_column(PRE_ATTENTION_LOGITS) else {
        panic!("no pre-attention channel in {:?}", view.meta.channels);
    };
    let model =
        MoeModel::load(&Checkpoint::open(&model_dir).unwrap(), &Default::default()).unwrap();
    let computed = offload::gate::pre_attention_logits(&model, &view).unwrap();
    assert_eq!(recorded.len(), computed.len());
    assert_eq!(
        recorded.len(),
        view.n_tokens() * view.meta.n_moe() * view.meta.n_experts as usize
    );
    assert!(view.n_tokens() >= 12);
    for (a, b) in recorded.iter().zip(&computed) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }

    // Without the channel the study needs the model; with it, it does not, and both
    // give the same hit rate.
    let from_model = run_study(&settings(&out, Some(model_dir)), |_, _| {}).unwrap();
    let from_trace = run_study(&settings(&out, None), |_, _| {}).unwrap();
    let hits = |s: &offload::simulate::study::Study| {
        s.rows.iter().map(|r| r.untimed.hits).collect::<Vec<_>>()
    };
    assert_eq!(hits(&from_trace), hits(&from_model));
    assert!(hits(&from_trace).iter().all(|&h| h > 0));
    let bare = dir.path().join("bare.mctrace");
    let mut plain = trace.clone();
    plain.meta.channels.clear();
    plain.channels.clear();
    datasets::save_trace(&plain, &bare, None).unwrap();
    let err = run_study(&settings(&bare, None), |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("--pre-attention-logits"), "{err}");
}
