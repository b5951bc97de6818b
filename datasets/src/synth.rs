//! Seeded synthetic routing traces with controllable locality, for tests, benchmarks
//! and the demo before a real model is at hand. Each (sequence, layer) keeps each of
//! the previous token's experts with probability `stickiness`, and fills the rest from
//! a Zipf-skewed popularity with a per-layer permutation (so layers differ).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::trace::{Phase, RoutingTrace, TokenRecord, TraceBuilder, TraceMeta};

/// Shape and behaviour of a synthetic trace.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub n_layers: u32,
    pub n_experts: u32,
    pub top_k: u32,
    pub sequences: usize,
    pub tokens_per_sequence: usize,
    /// Probability that an expert of token t-1 is kept at token t.
    pub stickiness: f64,
    /// Zipf exponent of expert popularity (0 = uniform).
    pub zipf: f64,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            n_layers: 8,
            n_experts: 32,
            top_k: 4,
            sequences: 16,
            tokens_per_sequence: 128,
            stickiness: 0.3,
            zipf: 0.8,
            seed: 0,
        }
    }
}

fn synthetic_meta(cfg: &SynthConfig) -> TraceMeta {
    TraceMeta {
        channels: Vec::new(),
        model: format!("synthetic-seed{}", cfg.seed),
        architecture: Some("synthetic".into()),
        n_layers: cfg.n_layers,
        moe_layers: (0..cfg.n_layers).collect(),
        n_experts: cfg.n_experts,
        top_k: cfg.top_k,
        n_shared_experts: 0,
        source: Some("moecast synth".into()),
        tokenizer: None,
        ranked: true,
        expert_bytes: None,
    }
}

/// Generates a synthetic trace (all layers MoE, ranked, with weights).
pub fn synthetic_trace(cfg: &SynthConfig) -> RoutingTrace {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let e = cfg.n_experts as usize;
    let k = cfg.top_k as usize;
    let nl = cfg.n_layers as usize;
    let meta = synthetic_meta(cfg);
    let popularity: Vec<f64> = (0..e)
        .map(|i| 1.0 / ((i + 1) as f64).powf(cfg.zipf))
        .collect();
    let total: f64 = popularity.iter().sum();
    let perms: Vec<Vec<u32>> = (0..nl)
        .map(|_| {
            let mut p: Vec<u32> = (0..cfg.n_experts).collect();
            p.shuffle(&mut rng);
            p
        })
        .collect();
    let draw = |rng: &mut StdRng, l: usize| -> u32 {
        let mut x = rng.random::<f64>() * total;
        for (i, w) in popularity.iter().enumerate() {
            x -= w;
            if x <= 0.0 {
                return perms[l][i];
            }
        }
        perms[l][e - 1]
    };
    let mut builder = TraceBuilder::new(meta, true).expect("synthetic meta is valid");
    for s in 0..cfg.sequences {
        let mut prev: Vec<Vec<u32>> = vec![Vec::new(); nl];
        for pos in 0..cfg.tokens_per_sequence {
            let mut experts = Vec::with_capacity(nl);
            let mut weights = Vec::with_capacity(nl);
            for (l, prev_ids) in prev.iter_mut().enumerate() {
                let mut ids: Vec<u32> = prev_ids
                    .iter()
                    .copied()
                    .filter(|_| rng.random::<f64>() < cfg.stickiness)
                    .collect();
                while ids.len() < k {
                    let x = draw(&mut rng, l);
                    if !ids.contains(&x) {
                        ids.push(x);
                    }
                }
                ids.shuffle(&mut rng);
                let mut w: Vec<f32> = (0..k).map(|_| rng.random::<f32>() + 0.05).collect();
                w.sort_by(|a, b| b.total_cmp(a));
                let sum: f32 = w.iter().sum();
                w.iter_mut().for_each(|x| *x /= sum);
                *prev_ids = ids.clone();
                experts.push(Some(ids));
                weights.push(Some(w));
            }
            let rec = TokenRecord {
                channels: Default::default(),
                seq: format!("seq{s:03}"),
                pos: pos as u32,
                phase: if pos < cfg.tokens_per_sequence / 4 {
                    Phase::Prefill
                } else {
                    Phase::Decode
                },
                token: Some(rng.random_range(0..32_000)),
                experts,
                weights: Some(weights),
            };
            builder.push(&rec).expect("synthetic record is valid");
        }
    }
    builder.finish().expect("at least one token")
}

/// A trace whose routing depends on the token id *and* on the previous token's routing:
/// at each layer the first `ceil(k/2)` experts are a fixed function of the id (ids drawn
/// uniformly from `0..vocab`), the rest a fixed function of the previous token's
/// id-chosen experts at that layer (random at a sequence's start). A per-token-id table
/// finds the first half; only a model that also reads the previous token's routing finds
/// the rest. `stickiness` and `zipf` are not used.
pub fn token_routed_trace(cfg: &SynthConfig, vocab: u32) -> RoutingTrace {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (e, k, nl) = (cfg.n_experts, cfg.top_k as usize, cfg.n_layers as usize);
    let from_id = k.div_ceil(2);
    let mut builder =
        TraceBuilder::new(synthetic_meta(cfg), true).expect("synthetic meta is valid");
    let distinct = |mut ids: Vec<u32>, mut x: u32| {
        while ids.contains(&x) {
            x = (x + 1) % e;
        }
        ids.push(x);
        ids
    };
    for s in 0..cfg.sequences {
        let mut prev: Vec<Vec<u32>> = (0..nl)
            .map(|_| (0..from_id).map(|_| rng.random_range(0..e)).collect())
            .collect();
        for pos in 0..cfg.tokens_per_sequence {
            let token = rng.random_range(0..vocab.max(1));
            let mut experts = Vec::with_capacity(nl);
            for (l, prev_ids) in prev.iter_mut().enumerate() {
                let l = l as u32;
                let mut ids = Vec::with_capacity(k);
                for j in 0..from_id as u32 {
                    ids = distinct(ids, (token * 7 + l * 13 + j * 5) % e);
                }
                for j in 0..(k - from_id) {
                    let p = prev_ids[j % prev_ids.len()];
                    ids = distinct(ids, (p * 5 + 3 + l + j as u32) % e);
                }
                *prev_ids = ids[..from_id].to_vec();
                experts.push(Some(ids));
            }
            let rec = TokenRecord {
                channels: Default::default(),
                seq: format!("seq{s:03}"),
                pos: pos as u32,
                phase: Phase::Decode,
                token: Some(token),
                experts,
                weights: None,
            };
            builder.push(&rec).expect("synthetic record is valid");
        }
    }
    builder.finish().expect("at least one token")
}
