//! The offloading engine: experts read from disk into a bounded cache generate exactly
//! what the all-in-memory model generates; its counters add up; cache-aware routing
//! steers towards resident experts and its quality cost is measured; a broken weight
//! file fails the forward with the file's name.

use std::path::{Path, PathBuf};

use datasets::examples::RoutingShape;
use inference::generate::{generate, Sampling};
use inference::routing::NoObserver;
use inference::RouteDecision;
use inference::{Checkpoint, MoeModel};
use offload::cache::EvictionPolicy;
use offload::engine::quality::compare_routing;
use offload::engine::{EngineConfig, OffloadEngine};
use predictor::baselines::BaselineStats;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(name: &str) -> PathBuf {
    root().join("inference/tests/fixtures/hf").join(name)
}

fn config(capacity: usize, policy: EvictionPolicy, margin: f32) -> EngineConfig {
    EngineConfig {
        routing_margin: margin,
        ..EngineConfig::demand_paging(capacity, policy)
    }
}

fn load(dir: &Path) -> (Checkpoint, MoeModel) {
    let ck = Checkpoint::open(dir).unwrap();
    let device = inference::device::BackendKind::from_test_env().device();
    let model = MoeModel::load(&ck, &device).unwrap();
    (ck, model)
}

fn prompt(vocab: usize, n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729) % vocab) as u32)
        .collect()
}

/// Generates `prompts` prompts of 5 tokens greedily, `n` new tokens each, through
/// `engine` (a new request each) and asserts the tokens and logits equal the in-memory
/// `reference`'s.
fn generates_as_in_memory(
    reference: &MoeModel,
    model: &MoeModel,
    engine: &mut OffloadEngine,
    prompts: std::ops::Range<usize>,
    n: usize,
    what: &str,
) {
    let vocab = reference.shape().vocab_size;
    for salt in prompts {
        let p = prompt(vocab, 5, salt);
        let want = generate(reference, &p, n, &Sampling::Greedy, None, &mut NoObserver).unwrap();
        engine.new_request();
        let got = generate(model, &p, n, &Sampling::Greedy, None, engine).unwrap();
        assert_eq!(got.generated, want.generated, "{what}: tokens differ");
        assert_eq!(got.step_logits, want.step_logits, "{what}: logits differ");
    }
}

#[test]
fn offloaded_generation_is_identical_and_counters_add_up() {
    for name in [
        "mixtral",
        "qwen2_moe",
        "qwen3_moe_sharded_bf16",
        "deepseek_v3",
    ] {
        let dir = fixture(name);
        let (ck, reference) = load(&dir);
        let shape = reference.shape();
        let (m, k) = (shape.moe_layers.len(), shape.top_k);
        for (capacity, policy) in [
            (2, EvictionPolicy::Lru),
            (3, EvictionPolicy::Lfu { decay: 0.01 }),
            (3, EvictionPolicy::NextUse),
        ] {
            let mut model = reference.clone();
            let device = inference::device::BackendKind::from_test_env().device();
            let mut engine = OffloadEngine::new(
                &ck,
                &mut model,
                config(capacity, policy, 0.0),
                None,
                &device,
            )
            .unwrap();
            generates_as_in_memory(&reference, &model, &mut engine, 0..2, 12, name);
            let r = engine.report();
            assert_eq!(r.decode_tokens, 24, "{name}");
            assert_eq!(r.step_ms.len(), 24, "{name}: one time per decode step");
            let steps_s: f64 = r.step_ms.iter().map(|&ms| f64::from(ms) / 1e3).sum();
            assert!(
                (steps_s - r.decode_s).abs() < 1e-3,
                "{name}: {steps_s} vs {}",
                r.decode_s
            );
            assert_eq!(
                r.accesses,
                24 * (m * k) as u64,
                "{name}: one lookup per token, layer and k"
            );
            assert_eq!(r.hits + r.late + r.misses, r.accesses, "{name}");
            assert!(r.misses > 0 && r.prefetches == 0, "{name}: {r:?}");
            // Every decode miss was read, plus the prompt's; nothing is read twice at once.
            assert!(r.demand_reads >= r.misses, "{name}: {r:?}");
            let per_expert = ck
                .expert_bytes(shape.moe_layers[0], shape.n_experts)
                .unwrap();
            assert_eq!(r.bytes_demand, r.demand_reads * per_expert, "{name}");
        }
    }
}

#[test]
fn a_cache_holding_every_expert_misses_only_once_per_expert() {
    let (ck, reference) = load(&fixture("qwen3_moe"));
    let shape = reference.shape();
    let total = shape.moe_layers.len() * shape.n_experts;
    let mut model = reference.clone();
    let device = inference::device::BackendKind::from_test_env().device();
    let mut engine = OffloadEngine::new(
        &ck,
        &mut model,
        config(total, EvictionPolicy::Lru, 0.0),
        None,
        &device,
    )
    .unwrap();
    for salt in 0..3 {
        engine.new_request();
        generate(
            &model,
            &prompt(shape.vocab_size, 4, salt),
            10,
            &Sampling::Greedy,
            None,
            &mut engine,
        )
        .unwrap();
    }
    let r = engine.report();
    assert!(r.demand_reads as usize <= total, "{r:?}");
    assert!(r.hits > 0 && r.wasted_reads == 0, "{r:?}");
}

#[test]
fn fused_expert_checkpoints_are_refused_by_name() {
    let (ck, mut model) = load(&fixture("gpt_oss"));
    let device = inference::device::BackendKind::from_test_env().device();
    let err = OffloadEngine::new(
        &ck,
        &mut model,
        config(4, EvictionPolicy::Lru, 0.0),
        None,
        &device,
    )
    .err()
    .expect("gpt_oss has fused experts");
    assert!(err.to_string().contains("fused"), "{err}");
    let err = OffloadEngine::new(
        &ck,
        &mut model,
        config(4, EvictionPolicy::Belady, 0.0),
        None,
        &device,
    )
    .err()
    .expect("belady is offline only");
    assert!(err.to_string().contains("belady"), "{err}");
}

#[test]
fn cache_aware_routing_steers_to_resident_experts_at_a_measured_cost() {
    let dir = root().join("checkpoints/tiny-moe");
    let (ck, reference) = load(&dir);
    let shape = reference.shape();
    let total = shape.moe_layers.len() * shape.n_experts;
    let tok = inference::tokenizer::TextTokenizer::load(&dir).unwrap();
    let text = std::fs::read_to_string(root().join("prompts/heldout.txt")).unwrap();
    let seqs: Vec<Vec<u32>> = text
        .lines()
        .take(4)
        .map(|l| tok.encode(l, false, shape.vocab_size).unwrap())
        .collect();
    let device = inference::device::BackendKind::from_test_env().device();
    let run = |margin: f32| {
        let mut model = reference.clone();
        let mut engine = OffloadEngine::new(
            &ck,
            &mut model,
            config(total / 4, EvictionPolicy::Lru, margin),
            None,
            &device,
        )
        .unwrap();
        let q = compare_routing(&reference, &model, &mut engine, &seqs).unwrap();
        (q, engine.report().clone())
    };
    let (plain_q, plain) = run(0.0);
    let (steered_q, steered) = run(0.3);
    // Unmodified routing: the engine agrees with the batched reference everywhere.
    assert_eq!(plain.routings, 0);
    assert!(plain_q.agreement > 0.99, "{plain_q:?}");
    assert!((plain_q.perplexity_engine / plain_q.perplexity_reference - 1.0).abs() < 1e-3);
    // Steered: routing changes, fewer misses, and the cost shows in perplexity.
    assert!(steered.rerouted > 0 && steered.routings > 0, "{steered:?}");
    assert!(
        steered.misses < plain.misses,
        "{} vs {}",
        steered.misses,
        plain.misses
    );
    assert!(steered_q.agreement < 1.0, "{steered_q:?}");
    assert!(
        steered_q.perplexity_engine > steered_q.perplexity_reference,
        "{steered_q:?}"
    );
}

#[test]
fn a_truncated_weight_file_fails_the_forward_naming_it() {
    let src = fixture("qwen3_moe");
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let (ck, mut model) = load(dir.path());
    let vocab = model.shape().vocab_size;
    let device = inference::device::BackendKind::from_test_env().device();
    let mut engine = OffloadEngine::new(
        &ck,
        &mut model,
        config(2, EvictionPolicy::Lru, 0.0),
        None,
        &device,
    )
    .unwrap();
    let weights = dir.path().join("model.safetensors");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap();
    f.set_len(1024).unwrap();
    let err = generate(
        &model,
        &prompt(vocab, 4, 0),
        4,
        &Sampling::Greedy,
        None,
        &mut engine,
    )
    .expect_err("reads past the end fail");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn gate_prefetches_find_experts_before_routing_and_change_no_token() {
    // The shipped demo model: a trained router and LM head, unlike the random fixtures, so
    // the gate on the layer's input before attention says much about the routing after it,
    // and the logit lens about the next token's first layer.
    let (ck, reference) = load(&root().join("checkpoints/tiny-moe"));
    let shape = reference.shape();
    let total = shape.moe_layers.len() * shape.n_experts;
    let device = inference::device::BackendKind::from_test_env().device();
    let mut found = Vec::new();
    for (pre_attention, lens) in [(false, false), (true, false), (false, true)] {
        let mut model = reference.clone();
        let cfg = EngineConfig {
            pre_attention,
            lens,
            ..config(total / 10, EvictionPolicy::Lru, 0.0)
        };
        let mut engine = OffloadEngine::new(&ck, &mut model, cfg, None, &device).unwrap();
        let what = format!("pre-attention {pre_attention}, lens {lens}");
        generates_as_in_memory(&reference, &model, &mut engine, 0..3, 12, &what);
        let r = engine.report().clone();
        assert_eq!(r.hits + r.late + r.misses, r.accesses);
        let name = match (pre_attention, lens) {
            (true, _) => "pre-attention gate",
            (_, true) => "logit lens",
            _ => "none",
        };
        assert_eq!(r.prefetch, name);
        assert_eq!(r.prefetches > 0, pre_attention || lens, "{r:?}");
        found.push(r.hits + r.late);
    }
    assert!(
        found[1] > found[0] && found[2] > found[0],
        "prefetched experts are resident or arriving at routing: {found:?}"
    );
}

/// A layer whose prompt needs more experts than the cache holds reads each once, in the
/// order the forward uses them: no demand read is evicted while in flight (to be read
/// again), with or without prefetch.
#[test]
fn a_layer_needing_more_experts_than_the_cache_holds_reads_each_once() {
    let (ck, reference) = load(&root().join("checkpoints/tiny-moe"));
    let device = inference::device::BackendKind::from_test_env().device();
    for budget in [0, 2] {
        let mut model = reference.clone();
        let cfg = EngineConfig {
            pre_attention: budget > 0,
            budget,
            ..config(4, EvictionPolicy::Lru, 0.0)
        };
        let mut engine = OffloadEngine::new(&ck, &mut model, cfg, None, &device).unwrap();
        generates_as_in_memory(&reference, &model, &mut engine, 0..3, 4, "cache of 4");
        let r = engine.report();
        assert_eq!(r.wasted_demand_reads, 0, "{r:?}");
        assert_eq!(r.hits + r.late + r.misses, r.accesses);
    }
}

/// Planned prefetch in the engine: the planner reads the gate's candidates it judges
/// worth a read against the measured reads and layer times; outputs stay identical and
/// the report says what it decided.
#[test]
fn planned_prefetch_in_the_engine_changes_no_token_and_reports_its_decisions() {
    let (ck, reference) = load(&root().join("checkpoints/tiny-moe"));
    let shape = reference.shape();
    let total = shape.moe_layers.len() * shape.n_experts;
    let device = inference::device::BackendKind::from_test_env().device();
    let mut found = Vec::new();
    for (pre_attention, planned) in [(false, false), (true, true)] {
        let mut model = reference.clone();
        let cfg = EngineConfig {
            pre_attention,
            planned,
            budget: 4,
            ..config(total / 4, EvictionPolicy::Lru, 0.0)
        };
        let mut engine = OffloadEngine::new(&ck, &mut model, cfg, None, &device).unwrap();
        let what = format!("planned {planned}");
        generates_as_in_memory(&reference, &model, &mut engine, 0..3, 16, &what);
        let r = engine.report().clone();
        assert_eq!(r.hits + r.late + r.misses, r.accesses);
        // Without a prefetcher there is no budget.
        assert_eq!(r.budget, if planned { "auto" } else { "-" });
        assert_eq!(r.planner.is_some(), planned, "{r:?}");
        assert_eq!(r.planner_state.is_some(), planned, "{r:?}");
        if let Some(s) = r.planner_state {
            // It planned with what it measured.
            assert!(s.read_us > 0.0 && s.layer_period_us > 0.0, "{s:?}");
            assert!(s.entry_lifetime_lookups > 0.0, "{s:?}");
            assert!((0.0..=1.0).contains(&s.background_probability), "{s:?}");
            // The engine charges a wrong read's link time, at a load it measured.
            let load = s.wrong_read_load.expect("the engine charges wrong reads");
            assert!(load > 0.0 && load <= 1.0, "{s:?}");
        }
        if let Some(c) = r.planner {
            assert!(c.issued > 0 && c.issued < c.offered, "{c:?}");
            // Candidates already resident are offered but not judged.
            assert!(c.offered >= c.issued + c.late + c.not_worth, "{c:?}");
            assert!(r.prefetches <= c.issued, "{r:?}");
        }
        found.push(r.hits + r.late);
    }
    assert!(
        found[1] > found[0],
        "planned gate prefetches find experts: {found:?}"
    );
}

/// Each position's routing per MoE layer, as the model computes it.
struct RoutingRecorder {
    moe_index: std::collections::HashMap<usize, usize>,
    routing: Vec<Vec<Option<Vec<u16>>>>,
}

impl inference::RoutingObserver for RoutingRecorder {
    fn on_routing(&mut self, layer: usize, first_pos: usize, decisions: &[RouteDecision]) {
        let Some(&m) = self.moe_index.get(&layer) else {
            return;
        };
        let n = self.moe_index.len();
        for (i, d) in decisions.iter().enumerate() {
            let pos = first_pos + i;
            if self.routing.len() <= pos {
                self.routing.resize(pos + 1, vec![None; n]);
            }
            self.routing[pos][m] = Some(d.ids.iter().map(|&x| x as u16).collect());
        }
    }
}

/// The online blend in the engine: counts of the model's own routing on other prompts
/// start it; it forecasts the next layers after each layer routes, finds experts before
/// their routing and changes no token.
#[test]
fn the_online_blend_in_the_engine_finds_experts_and_changes_no_token() {
    let (ck, reference) = load(&root().join("checkpoints/tiny-moe"));
    let shape = reference.shape();
    let total = shape.moe_layers.len() * shape.n_experts;
    let device = inference::device::BackendKind::from_test_env().device();
    let mut counts = BaselineStats::new(
        RoutingShape {
            n_moe: shape.moe_layers.len(),
            n_experts: shape.n_experts,
            top_k: shape.top_k,
        },
        2,
    );
    for salt in 10..16 {
        let mut rec = RoutingRecorder {
            moe_index: shape.moe_index(),
            routing: Vec::new(),
        };
        let p = prompt(shape.vocab_size, 5, salt);
        let g = generate(&reference, &p, 24, &Sampling::Greedy, None, &mut rec).unwrap();
        let ids: Vec<u32> = p.iter().chain(&g.generated).copied().collect();
        for (tok, layers) in ids.iter().zip(&rec.routing) {
            let layers: Vec<Option<&[u16]>> = layers.iter().map(|x| x.as_deref()).collect();
            counts.add_routing(*tok, &layers);
        }
    }
    let mut found = Vec::new();
    for blend in [None, Some(counts)] {
        let mut model = reference.clone();
        let cfg = EngineConfig {
            blend: blend.clone(),
            ..config(total / 4, EvictionPolicy::Lru, 0.0)
        };
        let mut engine = OffloadEngine::new(&ck, &mut model, cfg, None, &device).unwrap();
        let what = format!("blend {}", blend.is_some());
        generates_as_in_memory(&reference, &model, &mut engine, 0..3, 16, &what);
        let r = engine.report().clone();
        assert_eq!(r.hits + r.late + r.misses, r.accesses);
        assert_eq!(
            r.prefetch,
            if blend.is_some() {
                "online blend"
            } else {
                "none"
            }
        );
        assert_eq!(r.prefetches > 0, blend.is_some(), "{r:?}");
        found.push(r.hits + r.late);
    }
    assert!(
        found[1] > found[0],
        "blend prefetches are resident or arriving at routing: {found:?}"
    );
}

/// The blend's counts must be of the model's routing shape.
#[test]
fn blend_counts_of_another_shape_are_refused() {
    let (ck, reference) = load(&root().join("checkpoints/tiny-moe"));
    let shape = reference.shape();
    let counts = BaselineStats::new(
        RoutingShape {
            n_moe: shape.moe_layers.len() + 1,
            n_experts: shape.n_experts,
            top_k: shape.top_k,
        },
        2,
    );
    let mut model = reference.clone();
    let cfg = EngineConfig {
        blend: Some(counts),
        ..config(8, EvictionPolicy::Lru, 0.0)
    };
    let device = inference::device::BackendKind::from_test_env().device();
    let err = OffloadEngine::new(&ck, &mut model, cfg, None, &device)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("blend's counts"), "{err}");
}

#[test]
fn a_model_loaded_without_routed_experts_runs_the_same_through_the_engine() {
    for name in ["mixtral", "deepseek_v3"] {
        let dir = fixture(name);
        let (ck, reference) = load(&dir);
        let device = inference::device::BackendKind::from_test_env().device();
        let mut light_ck = Checkpoint::open(&dir).unwrap();
        light_ck.skip_routed_experts();
        let mut model = MoeModel::load(&light_ck, &device).unwrap();
        assert!(
            model
                .sparse_layers_mut()
                .iter()
                .all(|m| m.experts.is_empty()),
            "{name}: no routed expert in memory"
        );
        let shape = reference.shape();
        let mut engine = OffloadEngine::new(
            &ck,
            &mut model,
            config(3, EvictionPolicy::Lru, 0.0),
            None,
            &device,
        )
        .unwrap();
        let p = prompt(shape.vocab_size, 5, 1);
        let want = generate(&reference, &p, 8, &Sampling::Greedy, None, &mut NoObserver).unwrap();
        engine.new_request();
        let got = generate(&model, &p, 8, &Sampling::Greedy, None, &mut engine).unwrap();
        assert_eq!(got.generated, want.generated, "{name}");
        assert_eq!(got.step_logits, want.step_logits, "{name}");
    }
}
