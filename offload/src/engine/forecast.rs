//! What the engine prefetches from: forecasts ranked and queued (or offered to the
//! planner), the predictor and the online blend fed each forward's routing, and the
//! blend's forecasts after each layer.

use inference::error::{ModelError, Result};
use inference::routing::RouteDecision;
use predictor::Task;

use super::{OffloadEngine, PrefetchSwitch};
use crate::prefetch::OnlineBlend;

impl OffloadEngine {
    pub(super) fn prefetch_forecast(&mut self, f: &predictor::ExpertForecast) {
        for l in f.first_layer..f.first_layer + f.n_layers() {
            self.prefetch_top(l, f.layer(l), true);
        }
    }

    /// Queues the `budget` best experts of MoE layer `m` by `scores` (`probs`: they
    /// are probabilities); planned, offers them to the planner.
    pub(super) fn prefetch_top(&mut self, m: usize, scores: &[f32], probs: bool) {
        let mut ranking = Vec::new();
        predictor::metrics::rank_top(scores, self.cfg.budget, &mut ranking);
        self.prefetch_ranked(m, &ranking, probs.then_some(scores));
    }

    /// Whether this decode step prefetches: always, unless the guard measured that it
    /// does not pay (or the alternation runs a window without it). When it does not, no
    /// forecast is computed either (the predictor and the blend still observe each
    /// token, so their history stays whole). The forecasts of the next token's layer 0
    /// made at a step's end follow this step's setting.
    pub(super) fn prefetching(&self) -> bool {
        self.switch.as_ref().is_none_or(PrefetchSwitch::enabled)
    }

    pub(super) fn prefetch_ranked(&mut self, m: usize, ranking: &[u16], probs: Option<&[f32]>) {
        if !self.prefetching() {
            return;
        }
        if self.planner.is_some() {
            return self.offer_planned(m, ranking, probs);
        }
        for &x in ranking {
            self.admit(m * self.n_experts + x as usize, false);
        }
    }

    /// This decode step's MoE layer `m` routed: the online blend forecasts the layers
    /// after it, and their best experts are queued.
    pub(super) fn blend_forecast(&mut self, m: usize) {
        let Some(blend) = &mut self.blend else {
            return;
        };
        let ids = |m: usize| self.routing[m].first().map(expert_ids);
        let Some(given) = ids(m) else {
            return;
        };
        let earlier = m.checked_sub(1).and_then(ids);
        let budget = self.cfg.budget;
        let mut forecasts = Vec::new();
        blend.forecast(m, &given, earlier.as_deref(), |target, scores| {
            // Ranked by score: probabilities saturate at 1 for the surest experts.
            let mut ranking = Vec::with_capacity(budget);
            predictor::metrics::rank_top(scores, budget, &mut ranking);
            let probs: Vec<f32> = scores
                .iter()
                .map(|&s| OnlineBlend::probability(s))
                .collect();
            forecasts.push((target, ranking, probs));
        });
        for (target, ranking, probs) in forecasts {
            self.prefetch_ranked(target, &ranking, Some(&probs));
        }
    }

    /// This decode step's routing is complete: the blend learns from it and counts it.
    /// (Prompt tokens are fed the same way, at their forward's end.)
    pub(super) fn blend_observe(&mut self) {
        let Some(blend) = &mut self.blend else {
            return;
        };
        for (i, &tok) in self.tokens.iter().enumerate() {
            let ids = token_routing(&self.routing, i);
            let ids: Vec<Option<&[u16]>> = ids.iter().map(|x| x.as_deref()).collect();
            blend.token_routed(tok, &ids);
        }
    }

    /// With `layer_forecasts`, a lookahead predictor forecasts layers `m+1..m+D` after
    /// this decode step's MoE layer `m` routed, from the layers routed so far.
    pub(super) fn predictor_layer_forecast(&mut self, m: usize) {
        if !self.cfg.layer_forecasts || m + 1 >= self.n_moe() || !self.prefetching() {
            return;
        }
        let Some(p) = &mut self.predictor else {
            return;
        };
        if p.predictor().card.config.task != Task::Lookahead {
            return;
        }
        let known: Vec<Vec<u16>> = self.routing[..=m]
            .iter()
            .map(|d| expert_ids(&d[0]))
            .collect();
        let known: Vec<&[u16]> = known.iter().map(Vec::as_slice).collect();
        let x = self.router_input.take();
        match p.predict_lookahead_with_input(self.tokens[0], &known, x.as_deref()) {
            Ok(f) => self.prefetch_forecast(&f),
            Err(e) => self.fail(ModelError::observer(e)),
        }
    }

    /// Feeds this forward's tokens and routing to the predictor; one trained with
    /// token-id dropout then forecasts the next token's layer 0 before its id, queued.
    pub(super) fn observe_forward(&mut self) -> Result<()> {
        self.observed = true;
        let prefetching = self.prefetching();
        let Some(p) = &mut self.predictor else {
            return Ok(());
        };
        for (i, &tok) in self.tokens.iter().enumerate() {
            let ids = token_routing(&self.routing, i);
            let ids: Vec<Option<&[u16]>> = ids.iter().map(|x| x.as_deref()).collect();
            p.observe(tok, &ids).map_err(ModelError::observer)?;
        }
        if p.predictor().card.config.token_dropout > 0.0 && prefetching {
            let f = p.predict_next_unknown().map_err(ModelError::observer)?;
            self.prefetch_top(0, f.layer(0), true);
        }
        Ok(())
    }
}

/// This forward's `i`-th token's experts per MoE layer (`None`: not routed).
fn token_routing(routing: &[Vec<RouteDecision>], i: usize) -> Vec<Option<Vec<u16>>> {
    routing.iter().map(|d| d.get(i).map(expert_ids)).collect()
}

/// A routing decision's experts as the forecasters take them.
fn expert_ids(d: &RouteDecision) -> Vec<u16> {
    d.ids.iter().map(|&x| x as u16).collect()
}
