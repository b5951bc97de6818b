//! Turning router scores into a top-k choice, and the hook through which every MoE
//! layer reports its routing.
//!
//! The selection runs on the host in f32 on the router logits `[T, E]` the model
//! computed, so the chosen ids and their order are exactly reproducible.

/// How a router turns logits into the top-k experts and their weights.
#[derive(Debug, Clone, PartialEq)]
pub enum RouterScoring {
    /// softmax over all experts, take the k largest; optionally renormalise them to sum
    /// to 1 (Mixtral always, Qwen2/3-MoE and OLMoE per `norm_topk_prob`).
    SoftmaxTopK { norm_topk_prob: bool },
}

/// The routing of one token at one MoE layer: ids in rank order and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Receives the routing of every MoE layer as the model computes it.
pub trait RoutingObserver {
    /// `layer` is the model layer index; `first_pos` the position of `decisions[0]`.
    fn on_routing(&mut self, layer: usize, first_pos: usize, decisions: &[RouteDecision]);
}

/// An observer that ignores everything.
pub struct NoObserver;

impl RoutingObserver for NoObserver {
    fn on_routing(&mut self, _: usize, _: usize, _: &[RouteDecision]) {}
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

impl RouterScoring {
    /// Chooses the experts of one token from its router logits.
    pub fn route(&self, logits: &[f32], k: usize) -> RouteDecision {
        match self {
            RouterScoring::SoftmaxTopK { norm_topk_prob } => {
                let probs = softmax(logits);
                let ids = top_k(&probs, k);
                let mut weights: Vec<f32> = ids.iter().map(|&i| probs[i]).collect();
                if *norm_topk_prob {
                    let s: f32 = weights.iter().sum();
                    weights.iter_mut().for_each(|w| *w /= s);
                }
                RouteDecision {
                    ids: ids.into_iter().map(|i| i as u32).collect(),
                    weights,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_top_k_ranks_and_normalises() {
        let r = RouterScoring::SoftmaxTopK {
            norm_topk_prob: true,
        };
        let d = r.route(&[0.0, 2.0, 1.0, -1.0], 2);
        assert_eq!(d.ids, vec![1, 2]);
        let e = 1f32.exp();
        assert!((d.weights[0] - e / (e + 1.0)).abs() < 1e-6);
        assert!((d.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let raw = RouterScoring::SoftmaxTopK {
            norm_topk_prob: false,
        }
        .route(&[0.0, 2.0, 1.0, -1.0], 2);
        assert!(raw.weights.iter().sum::<f32>() < 0.99);
    }
}
