//! Forecasts from the model's own weights: the next-token gate (logit lens) maps the last
//! MoE layer's router input to exactly the LM head's distribution on the same residual
//! (every architecture), tabulates each token's first-layer routing exactly as the
//! pre-attention gate computes it (models whose first MoE layer is decoder layer 0),
//! scores a trace's tokens from the token before with each of its tables, and on the
//! trained demo model forecasts the generated next token.

use std::path::{Path, PathBuf};

use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, TensorData};
use datasets::examples::RoutingShape;
use inference::generate::{generate, Sampling};
use inference::layers::to_vec;
use inference::routing::{top_k, RouteDecision, RoutingObserver};
use inference::{Checkpoint, MoeModel};
use offload::gate::NextTokenGate;
use predictor::baselines::BaselineStats;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load(dir: &Path) -> MoeModel {
    let ck = Checkpoint::open(dir).unwrap();
    MoeModel::load(&ck, &Default::default()).unwrap()
}

/// Records the pre-attention logits of model layer `layer` and the last position's
/// router input of model layer `last`, per forward.
struct Capture {
    layer: usize,
    last: usize,
    pre_attention: Vec<Vec<f32>>,
    last_inputs: Vec<Vec<f32>>,
}

impl RoutingObserver for Capture {
    fn on_routing(&mut self, _: usize, _: usize, _: &[RouteDecision]) {}

    fn wants_pre_attention_logits(&self) -> bool {
        true
    }

    fn on_pre_attention_logits(&mut self, layer: usize, _: usize, logits: &[f32], e: usize) {
        if layer == self.layer {
            self.pre_attention
                .extend(logits.chunks_exact(e).map(<[f32]>::to_vec));
        }
    }

    fn wants_router_inputs(&self, layer: usize) -> bool {
        layer == self.last
    }

    fn on_router_inputs(&mut self, layer: usize, _: usize, inputs: &[f32], hidden: usize) {
        if layer == self.last {
            self.last_inputs
                .push(inputs[inputs.len() - hidden..].to_vec());
        }
    }
}

fn capture(model: &MoeModel, prompt: &[u32], n: usize) -> (Capture, Vec<u32>) {
    let shape = model.shape();
    let mut obs = Capture {
        layer: shape.moe_layers[0],
        last: *shape.moe_layers.last().unwrap(),
        pre_attention: Vec::new(),
        last_inputs: Vec::new(),
    };
    let g = generate(model, prompt, n, &Sampling::Greedy, None, &mut obs).unwrap();
    (obs, g.generated)
}

#[test]
fn the_lens_is_the_lm_head_on_the_same_residual_for_every_architecture() {
    // For any residual h, the lens of the last router norm's output is the LM head's
    // distribution on the final norm's output.
    let fixtures = root().join("inference/tests/fixtures/hf");
    for name in [
        "qwen3_moe",
        "mixtral",
        "qwen2_moe",
        "olmoe",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
    ] {
        let model = load(&fixtures.join(name));
        let gate = NextTokenGate::new(&model).unwrap();
        let hidden = model.shape().hidden_size;
        let parts = model.lens_parts();
        let h: Vec<f32> = (0..3 * hidden)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i % 5) as f32)
            .collect();
        let h = Tensor::<2>::from_data(TensorData::new(h, [3, hidden]), &Default::default());
        let x = to_vec(parts.router_norms.last().unwrap().forward(h.clone()));
        let want = to_vec(softmax(
            parts.lm_head.forward(parts.final_norm.forward(h)),
            1,
        ));
        let got = gate.next_token_probs(&x);
        assert_eq!(got.len(), want.len(), "{name}");
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{name}: {a} vs {b}");
        }
    }
}

#[test]
fn next_token_gate_tabulates_the_first_layers_pre_attention_routing() {
    let fixtures = root().join("inference/tests/fixtures/hf");
    // Models whose first MoE layer is decoder layer 0 (its input is the embedding).
    for name in ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "gpt_oss"] {
        let mut model = load(&fixtures.join(name));
        let gate = NextTokenGate::new(&model).unwrap();
        let shape = model.shape();
        assert_eq!(shape.moe_layers[0], 0, "{name}");
        let prompt: Vec<u32> = (0..9)
            .map(|i| (i * 37 + 5) as u32 % shape.vocab_size as u32)
            .collect();
        let (obs, generated) = capture(&model, &prompt, 6);
        let tokens: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
        let scoring = model.sparse_layers_mut()[0].scoring.clone();
        assert_eq!(obs.pre_attention.len(), tokens.len(), "{name}");
        for (tok, logits) in tokens.iter().zip(&obs.pre_attention) {
            let mut want: Vec<u16> = top_k(&scoring.selection_scores(logits), shape.top_k)
                .into_iter()
                .map(|x| x as u16)
                .collect();
            want.sort_unstable();
            assert_eq!(gate.first_layer_experts(*tok), want, "{name} token {tok}");
        }
        assert!(gate.first_layer_experts(shape.vocab_size as u32).is_empty());
    }
}

#[test]
fn the_logit_lens_of_the_demo_model_forecasts_its_next_token() {
    let model = load(&root().join("checkpoints/tiny-moe"));
    let gate = NextTokenGate::new(&model).unwrap();
    let vocab = model.shape().vocab_size;
    let mut agree = 0;
    let mut total = 0;
    for prompt in [
        [0u32, 199, 432, 337, 451],
        [0, 266, 478, 1995, 451],
        [0, 14, 199, 2, 41],
    ] {
        let (obs, generated) = capture(&model, &prompt, 24);
        // Forward j's last router input precedes generated token j.
        for (x, &next) in obs.last_inputs.iter().zip(&generated) {
            let p = gate.next_token_probs(x);
            assert_eq!(p.len(), vocab);
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-3);
            let best = (0..vocab).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
            agree += usize::from(best as u32 == next);
            total += 1;
        }
    }
    let rate = agree as f64 / total as f64;
    eprintln!("lens top-1 = greedy next token: {agree}/{total}");
    assert!(
        rate > 0.3,
        "lens top-1 agrees with the greedy token {agree}/{total}"
    );
}

#[test]
fn observed_first_layer_counts_refine_the_lens_table() {
    let model = load(&root().join("inference/tests/fixtures/hf/qwen3_moe"));
    let gate = NextTokenGate::new(&model).unwrap();
    let shape = model.shape();
    let (e, k, vocab) = (shape.n_experts, shape.top_k, shape.vocab_size);
    let (token, other) = (5u32, 6u32);
    let gate_row = gate.first_layer_row(token).unwrap();
    let other_row = gate.first_layer_row(other).unwrap();
    // Three observations of `token`, each choosing k experts the gate did not.
    let mut counts = vec![0f32; e];
    for x in (0..e).filter(|&x| gate_row[x] == 0.0).take(k) {
        counts[x] = 3.0;
    }
    let routing = RoutingShape {
        n_moe: shape.moe_layers.len(),
        n_experts: e,
        top_k: k,
    };
    let mut stats = BaselineStats::new(routing, 1);
    stats.first_layer_by_token.insert(token, counts.clone());
    stats
        .first_layer_by_token
        .insert(vocab as u32 + 3, vec![1.0; e]);
    let x: Vec<f32> = (0..2 * shape.hidden_size)
        .map(|i| ((i * 7919 % 23) as f32 - 11.0) / 5.0)
        .collect();
    let probs = gate.next_token_probs(&x);
    let other_k = BaselineStats::new(
        RoutingShape {
            top_k: k + 1,
            ..routing
        },
        1,
    );
    let err = gate.clone().with_counts(Some(&other_k)).unwrap_err();
    assert!(err.to_string().contains("top-"), "{err}");
    let gate = gate.with_counts(Some(&stats)).unwrap();
    let row = gate.first_layer_row(token).unwrap();
    for (i, r) in row.iter().enumerate() {
        assert!(
            (r - (counts[i] + gate_row[i]) / 4.0).abs() < 1e-6,
            "expert {i}: {r}"
        );
    }
    assert!((row.iter().sum::<f32>() - k as f32).abs() < 1e-5);
    assert_eq!(gate.first_layer_row(other).unwrap(), other_row);
    // The scores are the next-token distribution over the refined rows.
    let scores = gate.scores(&x);
    let rows: Vec<Vec<f32>> = (0..vocab as u32)
        .map(|c| gate.first_layer_row(c).unwrap())
        .collect();
    for (p, s) in probs.chunks_exact(vocab).zip(scores.chunks_exact(e)) {
        for (i, &si) in s.iter().enumerate() {
            let want: f32 = p.iter().zip(&rows).map(|(pc, r)| pc * r[i]).sum();
            assert!((si - want).abs() < 1e-5, "expert {i}: {si} vs {want}");
        }
    }
}

#[test]
fn the_lens_scores_a_trace_from_each_token_before_with_every_table() {
    let model = load(&root().join("inference/tests/fixtures/hf/qwen3_moe"));
    let shape = model.shape();
    let (e, k, d, m) = (
        shape.n_experts,
        shape.top_k,
        shape.hidden_size,
        shape.moe_layers.len(),
    );
    let plain = NextTokenGate::new(&model).unwrap();
    let routing = RoutingShape {
        n_moe: m,
        n_experts: e,
        top_k: k,
    };
    let mut stats = BaselineStats::new(routing, 1);
    let mut counts = vec![0f32; e];
    counts[..k].fill(2.0);
    for token in 0..shape.vocab_size as u32 {
        stats.first_layer_by_token.insert(token, counts.clone());
    }
    let refined = plain.clone().with_counts(Some(&stats)).unwrap();
    // Two sequences of 4 and 3 tokens; the last MoE layer's router input of the third
    // token is missing (layer not computed).
    let meta = datasets::TraceMeta {
        model: "qwen3_moe".into(),
        architecture: Some("qwen3_moe".into()),
        n_layers: shape.n_layers as u32,
        moe_layers: shape.moe_layers.iter().map(|&l| l as u32).collect(),
        n_experts: e as u32,
        top_k: k as u32,
        n_shared_experts: 0,
        source: None,
        tokenizer: None,
        ranked: true,
        expert_bytes: None,
        channels: vec![datasets::Channel::router_inputs(d as u32)],
    };
    let mut b = datasets::TraceBuilder::new(meta, false).unwrap();
    let input = |t: usize| -> Vec<f32> {
        (0..d)
            .map(|i| (((i + 3) * (t + 7) * 7919 % 41) as f32 - 20.0) / 9.0)
            .collect()
    };
    for t in 0..7usize {
        let missing = t == 2;
        let experts = (0..m)
            .map(|l| (!(missing && l == m - 1)).then(|| (0..k as u32).collect()))
            .collect();
        let inputs = (0..m)
            .map(|l| (!(missing && l == m - 1)).then(|| input(t)))
            .collect();
        b.push(&datasets::TokenRecord {
            seq: if t < 4 { "a" } else { "b" }.into(),
            pos: if t < 4 { t } else { t - 4 } as u32,
            phase: datasets::Phase::Decode,
            token: Some(t as u32),
            experts,
            weights: None,
            channels: [("router_inputs".to_string(), inputs)].into(),
        })
        .unwrap();
    }
    let trace = b.finish().unwrap();
    let view = trace.view();
    let both = plain.first_layer_before_id_with(&[&refined], &view);
    assert_eq!(both.len(), 2);
    assert!(
        both[0]
            .iter()
            .zip(&both[1])
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "the refined table changes the scores"
    );
    // Token t is scored from token t-1's input, by each lens's own table; NaN at a
    // sequence start and after the token without an input.
    for (lens, scores) in [&plain, &refined].into_iter().zip(&both) {
        for t in 0..7usize {
            let row = &scores[t * e..(t + 1) * e];
            if [0, 3, 4].contains(&t) {
                assert!(row.iter().all(|x| x.is_nan()), "token {t}: {row:?}");
                continue;
            }
            // The input as the trace stores it (f16).
            let x: Vec<f32> = input(t - 1)
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect();
            for (a, b) in row.iter().zip(lens.scores(&x)) {
                assert!((a - b).abs() < 1e-5, "token {t}: {a} vs {b}");
            }
        }
    }
}
