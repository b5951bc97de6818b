//! What cache-aware routing costs: teacher-forced next-token agreement and perplexity of
//! the engine (decoding one token at a time, so its cache evolves as in generation)
//! against the same model with unmodified routing, on held-out token sequences.

use serde::{Deserialize, Serialize};

use crate::engine::OffloadEngine;
use inference::error::Result;
use inference::layers::to_vec;
use inference::models::MoeModel;
use inference::routing::NoObserver;

/// Agreement and perplexity of steered against unmodified routing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingQuality {
    /// Predicted positions (sequence length - 1, summed).
    pub positions: u64,
    /// Share of positions whose most likely next token is the same in both runs.
    pub agreement: f64,
    pub perplexity_reference: f64,
    pub perplexity_engine: f64,
}

impl RoutingQuality {
    /// Relative perplexity change of the engine, in percent.
    pub fn perplexity_delta_pct(&self) -> f64 {
        100.0 * (self.perplexity_engine / self.perplexity_reference - 1.0)
    }
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// `-log softmax(v)[target]`.
fn nll(v: &[f32], target: usize) -> f64 {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = v.iter().map(|&x| (x as f64 - m).exp()).sum();
    m + z.ln() - v[target] as f64
}

/// Runs every sequence through `reference` (all experts in memory, unmodified routing)
/// in one batch and through `offloaded` + `engine` one token at a time.
pub fn compare_routing(
    reference: &MoeModel,
    offloaded: &MoeModel,
    engine: &mut OffloadEngine,
    sequences: &[Vec<u32>],
) -> Result<RoutingQuality> {
    let (mut n, mut same, mut nll_ref, mut nll_eng) = (0u64, 0u64, 0f64, 0f64);
    for seq in sequences.iter().filter(|s| s.len() >= 2) {
        let inputs = &seq[..seq.len() - 1];
        let logits = reference.forward(inputs, &mut reference.new_cache(), &mut NoObserver)?;
        let vocab = logits.dims()[1];
        let reference_logits = to_vec(logits);
        engine.new_request();
        let mut cache = offloaded.new_cache();
        for (i, &tok) in inputs.iter().enumerate() {
            let e = to_vec(offloaded.forward(&[tok], &mut cache, engine)?);
            let r = &reference_logits[i * vocab..(i + 1) * vocab];
            let target = seq[i + 1] as usize;
            same += u64::from(argmax(r) == argmax(&e));
            nll_ref += nll(r, target);
            nll_eng += nll(&e, target);
            n += 1;
        }
    }
    let d = n.max(1) as f64;
    Ok(RoutingQuality {
        positions: n,
        agreement: same as f64 / d,
        perplexity_reference: (nll_ref / d).exp(),
        perplexity_engine: (nll_eng / d).exp(),
    })
}
