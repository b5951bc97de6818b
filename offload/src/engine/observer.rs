//! The engine as the model's [`RoutingObserver`]: each forward's start (the token's
//! forecasts), each MoE layer's routing (lookups, demand reads, the forecasts that follow
//! it), router inputs and pre-attention logits for the forecasters that read them, and
//! each forward's end (timings, the predictor and the blend fed).

use std::time::Instant;

use inference::error::{ModelError, Result};
use inference::routing::{ExpertSource, RouteDecision, RoutingObserver, RoutingPolicy};

use super::OffloadEngine;

impl RoutingObserver for OffloadEngine {
    fn on_forward(&mut self, first_pos: usize, tokens: &[u32]) {
        self.tokens = tokens.to_vec();
        self.routing.iter_mut().for_each(Vec::clear);
        self.decoding = inference::generate::is_decode_step(first_pos, tokens.len());
        self.position = first_pos;
        self.step += 1;
        self.next_layer = 0;
        self.started = Instant::now();
        self.observed = false;
        self.pinned.clear();
        self.drain();
        if !self.decoding {
            return;
        }
        if let Some(p) = &mut self.planner {
            p.clock.token_started();
        }
        if !self.prefetching() {
            return;
        }
        self.oracle_prefetch(None);
        if let Some(st) = self.cfg.token_table.take() {
            let id = (tokens[0] != datasets::UNKNOWN_TOKEN).then_some(tokens[0]);
            let mut ranking = Vec::new();
            for m in 0..self.n_moe() {
                st.rank_token(m, id, self.cfg.budget, &mut ranking);
                self.prefetch_ranked(m, &ranking, None);
            }
            self.cfg.token_table = Some(st);
        }
        if let Some(p) = &mut self.predictor {
            match p.predict_next(tokens[0]) {
                Ok(f) => self.prefetch_forecast(&f),
                Err(e) => self.fail(ModelError::observer(e)),
            }
        }
    }

    fn on_routing(&mut self, layer: usize, _first_pos: usize, decisions: &[RouteDecision]) {
        let Some(&m) = self.moe_index.get(&layer) else {
            return;
        };
        self.routing[m] = decisions.to_vec();
        self.next_layer = m + 1;
        self.drain();
        self.pinned.clear();
        let mut needed: Vec<usize> = decisions
            .iter()
            .flat_map(|d| d.ids.iter().map(|&x| m * self.n_experts + x as usize))
            .collect();
        needed.sort_unstable();
        needed.dedup();
        // The prompt's batch is not one visit: only decode steps feed the reuse gaps; the
        // kept LFU's clock moves by its tokens.
        if self.decoding {
            self.cache.visit(m, &needed);
        } else {
            self.cache.batch_passed(decisions.len());
        }
        // A layer may need more experts than the cache holds (a prompt's batch, a small
        // cache): only the first the forward runs (in ascending id order) are read now;
        // admitting the rest would evict experts whose reads are still in flight. Each of
        // the rest is read when the forward reaches it.
        let ahead = self.cache.capacity();
        let mut misses = 0;
        for (i, &id) in needed.iter().enumerate() {
            if self.decoding {
                self.report.accesses += 1;
                if self.resident.contains_key(&id) {
                    self.report.hits += 1;
                } else if self.arriving(id) {
                    self.report.late += 1;
                } else {
                    self.report.misses += 1;
                    misses += 1;
                }
            }
            if i < ahead {
                self.admit(id, true);
            }
        }
        if self.decoding {
            self.planned_routing(m, &needed, misses);
            if self.prefetching() {
                // Planned: the candidates deferred at earlier moments (too far ahead or
                // not worth a read then) are judged again now, as in the simulator.
                self.offer_planned(m, &[], None);
                self.blend_forecast(m);
                self.oracle_prefetch(Some(m));
            }
        }
        if self.decoding && m + 1 == self.n_moe() {
            // The token's routing is complete: the forecasts of the next token's layer 0
            // (the logit lens, then the predictor's before the id) get the last layer's
            // compute as lead time.
            if let (Some(lens), Some(x), true) =
                (&self.lens, &self.router_input, self.prefetching())
            {
                let scores = lens.scores(x);
                let last = scores.len().saturating_sub(self.n_experts);
                self.prefetch_top(0, &scores[last..], false);
            }
            if let Err(e) = self.observe_forward() {
                self.fail(e);
            }
        }
        if self.decoding {
            self.predictor_layer_forecast(m);
        }
    }

    /// The lens reads the last MoE layer's router input; a lookahead predictor with
    /// hidden features every layer's.
    fn wants_router_inputs(&self, layer: usize) -> bool {
        let last = self.moe_index.get(&layer) == Some(&(self.n_moe() - 1));
        self.decoding
            && self.prefetching()
            && (self.lens.is_some() && last
                || self.cfg.layer_forecasts
                    && self
                        .predictor
                        .as_ref()
                        .is_some_and(|p| p.predictor().card.config.features.hidden()))
    }

    fn on_router_inputs(
        &mut self,
        _layer: usize,
        _first_pos: usize,
        inputs: &[f32],
        _hidden: usize,
    ) {
        self.router_input = Some(inputs.to_vec());
    }

    fn wants_pre_attention_logits(&self) -> bool {
        self.decoding && self.cfg.pre_attention && self.prefetching()
    }

    fn on_pre_attention_logits(
        &mut self,
        layer: usize,
        _first_pos: usize,
        logits: &[f32],
        e: usize,
    ) {
        let Some(&m) = self.moe_index.get(&layer) else {
            return;
        };
        self.drain();
        self.prefetch_top(m, &logits[..e], false);
    }

    fn policy(&mut self) -> Option<&mut dyn RoutingPolicy> {
        Some(self)
    }

    fn expert_source(&mut self) -> Option<&mut dyn ExpertSource> {
        Some(self)
    }

    fn on_forward_done(&mut self) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        if self.decoding {
            self.report.decode_tokens += 1;
            self.report.decode_s += elapsed;
            self.report.step_ms.push((elapsed * 1e3) as f32);
            if let Some(s) = &mut self.switch {
                if let Some(window) = s.step_done(elapsed) {
                    self.report.prefetch_windows.push(window);
                }
                self.report.prefetch_off_tokens = s.steps_off();
            }
        } else {
            self.report.prompt_tokens += self.tokens.len() as u64;
            self.report.prefill_s += elapsed;
        }
        if !self.observed {
            self.observe_forward()?;
        }
        self.blend_observe();
        Ok(())
    }
}
