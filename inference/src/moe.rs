//! The sparse MoE feed-forward block: a router, routed experts addressable one by one
//! as (layer, expert id), and optional shared experts.

use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::layers::{to_vec, Dense, SwiGlu};
use crate::routing::{RouteDecision, RouterScoring, RoutingObserver};

/// Always-active experts beside the routed ones, optionally scaled by a sigmoid gate
/// (Qwen2-MoE's `shared_expert_gate`).
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub mlp: SwiGlu,
    pub gate: Option<Dense>,
}

/// One MoE layer.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    /// Model layer index, reported to the observer.
    pub layer: usize,
    pub router: Dense,
    pub scoring: RouterScoring,
    pub top_k: usize,
    /// Routed experts in memory; empty once offloaded (the observer supplies them).
    pub experts: Vec<SwiGlu>,
    /// Checkpoint tensor names of each routed expert's `[gate, up, down]` projections
    /// (without `.weight`), so an offloading runtime can read one expert from disk;
    /// empty where the checkpoint fuses all experts into one tensor (GPT-OSS).
    pub expert_tensors: Vec<[String; 3]>,
    pub shared: Option<SharedExpert>,
}

impl SparseMoe {
    /// `x`: `[T, hidden]` for positions `first_pos..`; reports the routing and returns
    /// the block's output.
    pub fn forward(
        &self,
        x: Tensor<2>,
        first_pos: usize,
        observer: &mut dyn RoutingObserver,
    ) -> Result<Tensor<2>> {
        let [t, hidden] = x.dims();
        let device = x.device();
        if observer.wants_router_inputs(self.layer) {
            observer.on_router_inputs(self.layer, first_pos, &to_vec(x.clone()), hidden);
        }
        let logits = to_vec(self.router.forward(x.clone()));
        let e = self.n_experts();
        if observer.wants_router_logits() {
            observer.on_router_logits(self.layer, first_pos, &logits, e);
        }
        let route = |bonus: Option<&[f32]>| -> Vec<RouteDecision> {
            logits
                .chunks_exact(e)
                .map(|row| self.scoring.route_with_bonus(row, self.top_k, bonus))
                .collect()
        };
        let bonus = observer
            .policy()
            .and_then(|p| p.selection_bonus(self.layer));
        let decisions = match bonus {
            Some(bonus) => {
                let (chosen, plain) = (route(Some(&bonus)), route(None));
                if let Some(p) = observer.policy() {
                    p.on_rerouted(self.layer, &plain, &chosen);
                }
                chosen
            }
            None => route(None),
        };
        observer.on_routing(self.layer, first_pos, &decisions);
        let mut out = self.combine(x.clone(), &decisions, &device, observer)?;
        if let Some(shared) = &self.shared {
            let mut s = shared.mlp.forward(x.clone());
            if let Some(g) = &shared.gate {
                s = s * sigmoid(g.forward(x));
            }
            out = out + s;
        }
        debug_assert_eq!(out.dims(), [t, hidden]);
        Ok(out)
    }

    /// Number of routed experts (the router's outputs).
    pub fn n_experts(&self) -> usize {
        self.router.weight.dims()[1]
    }

    /// Reports the router applied to `normed` (the layer's input before attention, put
    /// through the norm that feeds this block) to the observer.
    pub fn report_pre_attention(
        &self,
        normed: Tensor<2>,
        first_pos: usize,
        observer: &mut dyn RoutingObserver,
    ) {
        let logits = to_vec(self.router.forward(normed));
        observer.on_pre_attention_logits(self.layer, first_pos, &logits, self.n_experts());
    }

    /// Drops the routed experts' weights from memory; from now on the observer's
    /// [`crate::routing::ExpertSource`] supplies them.
    pub fn offload_experts(&mut self) {
        self.experts = Vec::new();
    }

    /// Runs each chosen expert on its tokens and sums the weighted outputs.
    fn combine(
        &self,
        x: Tensor<2>,
        decisions: &[RouteDecision],
        device: &Device,
        observer: &mut dyn RoutingObserver,
    ) -> Result<Tensor<2>> {
        let [t, hidden] = x.dims();
        let mut per_expert: Vec<(Vec<i64>, Vec<f32>)> =
            vec![(Vec::new(), Vec::new()); self.n_experts()];
        for (tok, d) in decisions.iter().enumerate() {
            for (&id, &w) in d.ids.iter().zip(&d.weights) {
                per_expert[id as usize].0.push(tok as i64);
                per_expert[id as usize].1.push(w);
            }
        }
        let mut out = Tensor::<2>::zeros([t, hidden], device);
        for (id, (tokens, weights)) in per_expert.into_iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(tokens, [n]), device);
            let w = Tensor::<2>::from_data(TensorData::new(weights, [n, 1]), device);
            let input = x.clone().select(0, idx.clone());
            let y = match self.experts.get(id) {
                Some(expert) => expert.forward(input),
                None => observer
                    .expert_source()
                    .ok_or_else(|| {
                        ModelError::Input(format!(
                            "layer {}: expert {id} is offloaded and nothing supplies its weights",
                            self.layer
                        ))
                    })?
                    .expert(self.layer, id)?
                    .forward(input),
            } * w;
            out = out.select_assign(0, idx, y, IndexingUpdateOp::Add);
        }
        Ok(out)
    }
}

/// A decoder layer's feed-forward: a dense SwiGLU or a sparse MoE block.
#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(Box<SwiGlu>),
    Sparse(Box<SparseMoe>),
}

impl FeedForward {
    /// The MoE block, if this is one.
    pub fn sparse(&self) -> Option<&SparseMoe> {
        match self {
            FeedForward::Dense(_) => None,
            FeedForward::Sparse(moe) => Some(moe),
        }
    }

    /// The MoE block, if this is one (mutable).
    pub fn sparse_mut(&mut self) -> Option<&mut SparseMoe> {
        match self {
            FeedForward::Dense(_) => None,
            FeedForward::Sparse(moe) => Some(moe),
        }
    }

    /// `x`: `[T, hidden]` at positions `first_pos..`; MoE blocks report their routing.
    pub fn forward(
        &self,
        x: Tensor<2>,
        first_pos: usize,
        observer: &mut dyn RoutingObserver,
    ) -> Result<Tensor<2>> {
        match self {
            FeedForward::Dense(mlp) => Ok(mlp.forward(x)),
            FeedForward::Sparse(moe) => moe.forward(x, first_pos, observer),
        }
    }
}
