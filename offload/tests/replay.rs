//! Trace replay through the engine on a synthetic checkpoint: the checkpoint loads with
//! the shape asked for, every routing is forced to the recorded experts, and the engine
//! counts exactly the recorded lookups.

use inference::routing::{RouteDecision, RoutingObserver};
use inference::{Checkpoint, MoeModel};
use offload::cache::EvictionPolicy;
use offload::engine::replay::replay_sequence;
use offload::engine::{EngineConfig, OffloadEngine, PlanTimings};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tinymoe::synth::{expert_bytes, write_synthetic_checkpoint};
use tinymoe::TinyMoeConfig;

fn shape() -> TinyMoeConfig {
    TinyMoeConfig {
        vocab_size: 64,
        hidden_size: 32,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        num_experts: 8,
        top_k: 2,
        moe_intermediate_size: 16,
        context: 64,
        rope_theta: 1e4,
        rms_norm_eps: 1e-6,
        tie_embeddings: false,
    }
}

/// Records every routing it sees.
#[derive(Default)]
struct Recorder(Vec<(usize, Vec<u32>)>);

impl RoutingObserver for Recorder {
    fn on_routing(&mut self, layer: usize, _: usize, d: &[RouteDecision]) {
        let mut ids = d[0].ids.clone();
        ids.sort_unstable();
        self.0.push((layer, ids));
    }
}

/// `n` tokens' recorded experts: distinct random ids per layer, sorted.
fn recorded(rng: &mut StdRng, n: usize, c: &TinyMoeConfig) -> Vec<Vec<Option<Vec<u16>>>> {
    (0..n)
        .map(|_| {
            (0..c.num_layers)
                .map(|_| {
                    let mut ids: Vec<u16> = Vec::new();
                    while ids.len() < c.top_k {
                        let x = rng.random_range(0..c.num_experts as u16);
                        if !ids.contains(&x) {
                            ids.push(x);
                        }
                    }
                    ids.sort_unstable();
                    Some(ids)
                })
                .collect()
        })
        .collect()
}

#[test]
fn replay_forces_the_recorded_routing_through_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let c = shape();
    let written = write_synthetic_checkpoint(dir.path(), &c, 7).unwrap();
    let per_expert = expert_bytes(&c);
    assert!(written > per_expert * (c.num_layers * c.num_experts) as u64);
    let device = inference::device::BackendKind::from_test_env().device();
    let mut ck = Checkpoint::open(dir.path()).unwrap();
    let model = MoeModel::load(&ck, &device).unwrap();
    let s = model.shape();
    assert_eq!(
        (s.moe_layers.len(), s.n_experts, s.top_k, s.vocab_size),
        (3, 8, 2, 64)
    );

    let mut rng = StdRng::seed_from_u64(1);
    let tokens: Vec<u32> = (0..12).map(|_| rng.random_range(0..64)).collect();
    let experts = recorded(&mut rng, tokens.len(), &c);
    // With every expert in memory: each routing is the recorded one.
    let mut seen = Recorder::default();
    assert_eq!(
        replay_sequence(&model, &tokens, &experts, &[], &mut seen).unwrap(),
        0
    );
    let want: Vec<(usize, Vec<u32>)> = experts
        .iter()
        .flat_map(|layers| {
            layers
                .iter()
                .enumerate()
                .map(|(l, ids)| (l, ids.as_ref().unwrap().iter().map(|&x| x as u32).collect()))
        })
        .collect();
    assert_eq!(seen.0, want);

    // Through the engine (experts on disk): the decode steps' lookups are the recorded
    // ones, and the same experts leave the disk.
    ck.skip_routed_experts();
    let mut offloaded = MoeModel::load(&ck, &device).unwrap();
    let cfg = EngineConfig::demand_paging(6, EvictionPolicy::Lru);
    let mut engine = OffloadEngine::new(&ck, &mut offloaded, cfg, None, &device).unwrap();
    assert_eq!(
        replay_sequence(&offloaded, &tokens, &experts, &[], &mut engine).unwrap(),
        0
    );
    let r = engine.report().clone();
    assert_eq!(r.decode_tokens, tokens.len() as u64 - 1);
    assert_eq!(r.accesses, (tokens.len() as u64 - 1) * 3 * 2, "{r:?}");
    assert_eq!(r.hits + r.late + r.misses, r.accesses);
    assert_eq!(r.bytes_demand, r.demand_reads * per_expert, "{r:?}");
}

/// The oracle prefetcher of a replay reads every recorded expert before its layer routes:
/// no decode lookup misses, where demand paging misses.
#[test]
fn the_replay_oracle_reads_each_recorded_expert_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let c = shape();
    write_synthetic_checkpoint(dir.path(), &c, 7).unwrap();
    let device = inference::device::BackendKind::from_test_env().device();
    let mut ck = Checkpoint::open(dir.path()).unwrap();
    ck.skip_routed_experts();
    let mut rng = StdRng::seed_from_u64(2);
    let tokens: Vec<u32> = (0..16).map(|_| rng.random_range(0..64)).collect();
    let experts = recorded(&mut rng, tokens.len(), &c);
    let run_with = |cfg: EngineConfig| {
        let mut offloaded = MoeModel::load(&ck, &device).unwrap();
        let mut engine = OffloadEngine::new(&ck, &mut offloaded, cfg, None, &device).unwrap();
        engine.new_request();
        engine.replay_routing(&experts);
        replay_sequence(&offloaded, &tokens, &experts, &[], &mut engine).unwrap();
        engine.report().clone()
    };
    let run = |oracle_lead: Option<usize>, alternate_prefetch: Option<usize>| {
        run_with(EngineConfig {
            oracle_lead,
            alternate_prefetch,
            ..EngineConfig::demand_paging(12, EvictionPolicy::NextUse)
        })
    };
    let demand = run(None, None);
    assert!(demand.misses > 0, "{demand:?}");
    for lead in [1, 2, 3] {
        let r = run(Some(lead), None);
        assert_eq!(r.accesses, demand.accesses);
        assert_eq!(r.misses, 0, "lead {lead}: {r:?}");
        assert!(
            r.prefetches > 0 && r.useful_prefetches > 0,
            "lead {lead}: {r:?}"
        );
        assert!(r.prefetch.contains("oracle"), "{}", r.prefetch);
    }
    // Alternated in windows of 3 decode steps (15 here): a warm window and one measured
    // with prefetch, then off, on, off. The steps without it miss; the windows pair.
    let r = run(Some(1), Some(3));
    assert_eq!(r.alternate_window, 3);
    assert_eq!(r.prefetch_off_tokens, 6, "{r:?}");
    let settings: Vec<bool> = r.prefetch_windows.iter().map(|w| w.0).collect();
    assert_eq!(settings, [true, false, true, false], "{r:?}");
    assert!(r.misses > 0 && r.misses < demand.misses, "{r:?}");
    assert_eq!(r.paired_prefetch().map(|p| p.pairs), Some(1), "{r:?}");
    // Alternating with no prefetcher is refused, and so is a window too short to
    // measure.
    for (oracle_lead, window, refusal) in [
        (None, 3, "none (--predictor"),
        (Some(1), 1, "every 1 decode steps"),
    ] {
        let mut offloaded = MoeModel::load(&ck, &device).unwrap();
        let cfg = EngineConfig {
            oracle_lead,
            alternate_prefetch: Some(window),
            ..EngineConfig::demand_paging(12, EvictionPolicy::NextUse)
        };
        let err = OffloadEngine::new(&ck, &mut offloaded, cfg, None, &device)
            .err()
            .expect(refusal)
            .to_string();
        assert!(
            err.contains("--alternate-prefetch") && err.contains(refusal),
            "{err}"
        );
    }
    // Planned, the oracle's reads are offered to the planner as certain forecasts. It
    // plans with stated timings, so a loaded machine does not move its decisions: with
    // reads a tenth of a layer's time it reads them ahead; with reads a hundred layers
    // long none would save what it costs the demand reads it delays.
    let planned = |read_us: f64| {
        run_with(EngineConfig {
            oracle_lead: Some(2),
            planned: true,
            oracle_planned: true,
            plan_timings: Some(PlanTimings {
                read_us,
                layer_us: 1000.0,
            }),
            ..EngineConfig::demand_paging(12, EvictionPolicy::NextUse)
        })
    };
    let r = planned(100.0);
    let counts = r.planner.expect("the planner ran");
    assert_eq!(r.budget, "auto");
    assert!(counts.offered > 0 && counts.issued > 0, "{counts:?}");
    assert!(r.prefetches > 0 && r.misses < demand.misses, "{r:?}");
    let state = r.planner_state.expect("the planner's state");
    assert_eq!((state.read_us, state.layer_period_us), (100.0, 1000.0));
    let r = planned(100_000.0);
    let counts = r.planner.expect("the planner ran");
    assert!(counts.offered > 0 && counts.issued == 0, "{counts:?}");
    assert_eq!((r.prefetches, r.misses), (0, demand.misses), "{r:?}");
}

/// Records the router inputs it is given, per layer, and wants them at every layer.
#[derive(Default)]
struct InputRecorder(Vec<(usize, Vec<f32>)>);

impl RoutingObserver for InputRecorder {
    fn on_routing(&mut self, _: usize, _: usize, _: &[RouteDecision]) {}

    fn wants_router_inputs(&self, _: usize) -> bool {
        true
    }

    fn on_router_inputs(&mut self, layer: usize, _: usize, inputs: &[f32], hidden: usize) {
        assert_eq!(inputs.len(), hidden);
        self.0.push((layer, inputs.to_vec()));
    }
}

/// A replay with recorded router inputs gives the observer the recorded ones, whatever
/// their width, where a token has them; the model's own elsewhere.
#[test]
fn replay_gives_the_recorded_router_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let c = shape();
    write_synthetic_checkpoint(dir.path(), &c, 7).unwrap();
    let device = inference::device::BackendKind::from_test_env().device();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let model = MoeModel::load(&ck, &device).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let tokens: Vec<u32> = (0..4).map(|_| rng.random_range(0..64)).collect();
    let experts = recorded(&mut rng, tokens.len(), &c);
    // Width 5 (the recorded model's), layer 1 of token 2 not recorded; token 3 has none.
    let inputs: Vec<Vec<Option<Vec<f32>>>> = (0..3)
        .map(|t| {
            (0..c.num_layers)
                .map(|l| (t != 2 || l != 1).then(|| vec![(10 * t + l) as f32; 5]))
                .collect()
        })
        .collect();
    let mut seen = InputRecorder::default();
    replay_sequence(&model, &tokens, &experts, &inputs, &mut seen).unwrap();
    assert_eq!(seen.0.len(), tokens.len() * c.num_layers);
    for (i, (layer, x)) in seen.0.iter().enumerate() {
        let (t, l) = (i / c.num_layers, i % c.num_layers);
        assert_eq!(*layer, l);
        match inputs.get(t).and_then(|r| r[l].as_ref()) {
            Some(want) => assert_eq!(x, want, "token {t} layer {l}"),
            None => assert_eq!(x.len(), c.hidden_size, "token {t} layer {l}: the model's"),
        }
    }
}
