//! The engine's two ways of steering the model: cache-aware routing (a selection bonus
//! for resident experts) and the expert source (experts from the cache, read from disk
//! on a miss).

use std::time::Instant;

use inference::error::{ModelError, Result};
use inference::layers::SwiGlu;
use inference::routing::{ExpertSource, RouteDecision, RoutingPolicy};

use super::OffloadEngine;

/// Cache-aware routing: resident experts get `routing_margin` added to their scores.
impl RoutingPolicy for OffloadEngine {
    fn selection_bonus(&mut self, layer: usize) -> Option<Vec<f32>> {
        if self.cfg.routing_margin <= 0.0 {
            return None;
        }
        let &m = self.moe_index.get(&layer)?;
        self.drain();
        Some(
            (0..self.n_experts)
                .map(|x| {
                    if self.cache.contains(m * self.n_experts + x) {
                        self.cfg.routing_margin
                    } else {
                        0.0
                    }
                })
                .collect(),
        )
    }

    fn on_rerouted(&mut self, _layer: usize, plain: &[RouteDecision], chosen: &[RouteDecision]) {
        let set = |d: &RouteDecision| {
            let mut v = d.ids.clone();
            v.sort_unstable();
            v
        };
        self.report.routings += plain.len() as u64;
        self.report.rerouted += plain
            .iter()
            .zip(chosen)
            .filter(|(a, b)| set(a) != set(b))
            .count() as u64;
    }
}

/// Experts come from the cache, read from disk on a miss (waiting for a read already
/// queued); a failed read fails the forward with the file's name.
impl ExpertSource for OffloadEngine {
    fn expert(&mut self, layer: usize, x: usize) -> Result<SwiGlu> {
        let &m = self
            .moe_index
            .get(&layer)
            .ok_or_else(|| ModelError::Input(format!("layer {layer} has no MoE block")))?;
        let id = m * self.n_experts + x;
        let waited = Instant::now();
        loop {
            if let Some(expert) = self.resident.get(&id) {
                let expert = expert.clone();
                if self.unused_prefetch.remove(&id) {
                    self.report.useful_prefetches += 1;
                }
                if self.decoding {
                    let stall = waited.elapsed().as_secs_f64();
                    self.report.stall_s += stall;
                    if let Some(p) = &mut self.planner {
                        p.clock.stalled(stall);
                    }
                }
                return Ok(expert);
            }
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            // Not in flight, or in flight but evicted meanwhile (a read past those the
            // layer read ahead): admitting it keeps a read already running.
            if !self.arriving(id) || !self.cache.contains(id) {
                self.admit(id, true);
            }
            match self.loader.wait() {
                Some(l) => self.arrive(l),
                None => return Err(ModelError::Input("the expert loader stopped".into())),
            }
        }
    }
}
