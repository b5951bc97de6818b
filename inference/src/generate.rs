//! Prefill + decode with the KV cache, greedy or seeded sampling.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::layers::to_vec;
use crate::models::MoeModel;
use crate::routing::RoutingObserver;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Highest logit (lowest id on ties).
    Greedy,
    /// Softmax of logits / temperature, sampled with a seeded generator.
    Temperature { temperature: f32, seed: u64 },
}

impl Sampling {
    /// The command-line convention: temperature 0 (or below) means greedy.
    pub fn from_temperature(temperature: f32, seed: u64) -> Sampling {
        if temperature > 0.0 {
            Sampling::Temperature { temperature, seed }
        } else {
            Sampling::Greedy
        }
    }
}

/// Whether a forward of `n_tokens` at positions `first_pos..` is a decode step (one new
/// token after the prompt) rather than the prompt's prefill: how the engine and its
/// reference split their timings and counters.
pub fn is_decode_step(first_pos: usize, n_tokens: usize) -> bool {
    first_pos > 0 && n_tokens == 1
}

/// Picks a token from `logits`.
pub fn sample(logits: &[f32], rng: Option<(&mut StdRng, f32)>) -> u32 {
    match rng {
        None => {
            let mut best = 0;
            for (i, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = i;
                }
            }
            best as u32
        }
        Some((rng, t)) => {
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f64> = logits
                .iter()
                .map(|&v| (((v - m) / t) as f64).exp())
                .collect();
            let mut x = rng.random::<f64>() * p.iter().sum::<f64>();
            for (i, w) in p.iter().enumerate() {
                x -= w;
                if x <= 0.0 {
                    return i as u32;
                }
            }
            (p.len() - 1) as u32
        }
    }
}

/// Result of one generation: the generated ids and the logits after each forward.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    /// Logits of the last prompt position, then of each decode step.
    pub step_logits: Vec<Vec<f32>>,
}

/// Runs the prompt, then `max_new_tokens` decode steps. Every generated token is
/// forwarded once (so its routing is observed), including the last one. Stops early
/// after `stop_token`.
pub fn generate(
    model: &MoeModel,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &Sampling,
    stop_token: Option<u32>,
    observer: &mut dyn RoutingObserver,
) -> Result<Generation> {
    let mut cache = model.new_cache();
    let mut rng = match sampling {
        Sampling::Greedy => None,
        Sampling::Temperature { temperature, seed } => {
            Some((StdRng::seed_from_u64(*seed), *temperature))
        }
    };
    let logits = model.forward(prompt, &mut cache, observer)?;
    let [t, v] = logits.dims();
    let mut last = to_vec(logits.slice([t - 1..t, 0..v]));
    let mut out = Generation {
        prompt: prompt.to_vec(),
        generated: Vec::new(),
        step_logits: vec![last.clone()],
    };
    for _ in 0..max_new_tokens {
        let next = sample(&last, rng.as_mut().map(|(r, t)| (r, *t)));
        out.generated.push(next);
        let logits = model.forward(&[next], &mut cache, observer)?;
        last = to_vec(logits);
        out.step_logits.push(last.clone());
        if Some(next) == stop_token {
            break;
        }
    }
    Ok(out)
}
