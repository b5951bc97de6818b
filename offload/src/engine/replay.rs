//! Trace-driven runs: the model computes every token of a recorded sequence for real
//! (attention, routers, experts through the engine's cache and disk reads) while each
//! MoE layer's choice is forced to the recorded experts, so the engine is measured with
//! a real model's routing at whatever shape the checkpoint has. Where the trace recorded
//! each layer's router input, the observer is given the recorded one, not the
//! checkpoint's own: a predictor reading hidden states sees the recorded model's, as it
//! would in that model.

use std::collections::HashMap;

use inference::error::Result;
use inference::models::MoeModel;
use inference::routing::{ExpertSource, RouteDecision, RoutingObserver, RoutingPolicy};

/// Wraps an observer (the engine): forwards every hook, and makes each MoE layer choose
/// the experts in `forced` (a selection bonus large enough to beat any score; the
/// weights still come from the router's own scores).
pub struct ForcedRouting<'a> {
    inner: &'a mut dyn RoutingObserver,
    moe_index: HashMap<usize, usize>,
    n_experts: usize,
    /// Per MoE layer, the experts the current token must route to (`None`: its own).
    pub forced: Vec<Option<Vec<u16>>>,
    /// Per MoE layer, the current token's recorded router input (`None`: the model's).
    pub recorded_inputs: Vec<Option<Vec<f32>>>,
    /// Routings that differ from the forced set (a forced id beyond the router's
    /// range, or a group limit that excludes it).
    pub mismatches: u64,
}

impl<'a> ForcedRouting<'a> {
    pub fn new(model: &MoeModel, inner: &'a mut dyn RoutingObserver) -> Self {
        let shape = model.shape();
        ForcedRouting {
            inner,
            moe_index: shape.moe_index(),
            n_experts: shape.n_experts,
            forced: vec![None; shape.moe_layers.len()],
            recorded_inputs: vec![None; shape.moe_layers.len()],
            mismatches: 0,
        }
    }

    /// Model layer `layer`'s entry of `per_moe_layer` (indexed by MoE layer), if any.
    fn at_layer<'v, T>(&self, per_moe_layer: &'v [Option<T>], layer: usize) -> Option<&'v T> {
        self.moe_index
            .get(&layer)
            .and_then(|&m| per_moe_layer.get(m))
            .and_then(Option::as_ref)
    }

    fn forced_at(&self, layer: usize) -> Option<&Vec<u16>> {
        self.at_layer(&self.forced, layer)
    }
}

impl RoutingObserver for ForcedRouting<'_> {
    fn on_routing(&mut self, layer: usize, first_pos: usize, decisions: &[RouteDecision]) {
        if let Some(want) = self.forced_at(layer) {
            let mut want: Vec<u32> = want.iter().map(|&x| u32::from(x)).collect();
            want.sort_unstable();
            for d in decisions {
                let mut got = d.ids.clone();
                got.sort_unstable();
                self.mismatches += u64::from(got != want);
            }
        }
        self.inner.on_routing(layer, first_pos, decisions);
    }

    fn wants_router_inputs(&self, layer: usize) -> bool {
        self.inner.wants_router_inputs(layer)
    }

    fn on_router_inputs(&mut self, layer: usize, first_pos: usize, inputs: &[f32], hidden: usize) {
        match self.at_layer(&self.recorded_inputs, layer) {
            Some(x) => self.inner.on_router_inputs(layer, first_pos, x, x.len()),
            None => self
                .inner
                .on_router_inputs(layer, first_pos, inputs, hidden),
        }
    }

    fn wants_router_logits(&self) -> bool {
        self.inner.wants_router_logits()
    }

    fn on_router_logits(&mut self, layer: usize, first_pos: usize, logits: &[f32], e: usize) {
        self.inner.on_router_logits(layer, first_pos, logits, e);
    }

    fn wants_pre_attention_logits(&self) -> bool {
        self.inner.wants_pre_attention_logits()
    }

    fn on_pre_attention_logits(
        &mut self,
        layer: usize,
        first_pos: usize,
        logits: &[f32],
        e: usize,
    ) {
        self.inner
            .on_pre_attention_logits(layer, first_pos, logits, e);
    }

    fn on_forward(&mut self, first_pos: usize, tokens: &[u32]) {
        self.inner.on_forward(first_pos, tokens);
    }

    fn on_forward_done(&mut self) -> Result<()> {
        self.inner.on_forward_done()
    }

    fn policy(&mut self) -> Option<&mut dyn RoutingPolicy> {
        Some(self)
    }

    fn expert_source(&mut self) -> Option<&mut dyn ExpertSource> {
        self.inner.expert_source()
    }
}

/// Forcing: the recorded experts get a bonus no router score can beat.
impl RoutingPolicy for ForcedRouting<'_> {
    fn selection_bonus(&mut self, layer: usize) -> Option<Vec<f32>> {
        let want = self.forced_at(layer)?;
        let mut bonus = vec![0.0; self.n_experts];
        for &x in want {
            if let Some(b) = bonus.get_mut(x as usize) {
                *b = 1e9;
            }
        }
        Some(bonus)
    }
}

/// Runs `tokens` (one sequence) through `model` one token per forward, from an empty KV
/// cache, with token `t`'s routing forced to `experts[t]` (per MoE layer; `None`: the
/// router's own choice) and, where `router_inputs[t]` holds one (empty: none recorded),
/// the observer given that router input instead of the model's. Returns the routings
/// that could not be forced.
pub fn replay_sequence(
    model: &MoeModel,
    tokens: &[u32],
    experts: &[Vec<Option<Vec<u16>>>],
    router_inputs: &[Vec<Option<Vec<f32>>>],
    observer: &mut dyn RoutingObserver,
) -> Result<u64> {
    let mut cache = model.new_cache();
    let mut forced = ForcedRouting::new(model, observer);
    for (t, (&tok, want)) in tokens.iter().zip(experts).enumerate() {
        forced.forced.clone_from(want);
        match router_inputs.get(t) {
            Some(x) => forced.recorded_inputs.clone_from(x),
            None => forced.recorded_inputs.iter_mut().for_each(|x| *x = None),
        }
        model.forward(&[tok], &mut cache, &mut forced)?;
    }
    Ok(forced.mismatches)
}
