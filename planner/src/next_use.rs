//! [`NextUseForecast`]: when each expert is expected next, for the next-use eviction
//! policy (the simulator's and the engine's, and runtimes' through the C ABI and Python).

use crate::staging::{check_experts, check_layer};
use crate::StagingError;

/// Estimated next use of every expert, for the next-use eviction policy (the resident
/// expert expected latest goes first), in units of 1/[`Self::UNIT`] layer step (a step is
/// one layer visit: one MoE layer of one token; a layer comes round every `n_layers`
/// steps). Per layer it counts the gaps, in visits of the
/// layer, between an expert's consecutive uses; an expert idle for `a` visits (never
/// used: since the start) is expected back after the mean of the gaps longer than `a`,
/// minus `a` (the mean residual life); when no gap that long was seen, after another
/// `a` visits or one mean gap, whichever is longer (none seen at all: `n_experts`
/// visits). That residual life is the layer's; an expert used `r` times as often as the
/// layer's average expert lately (uses decayed with [`NextUseForecast::HALF_LIFE`], `r`
/// shrunk towards 1 by [`Self::PRIOR_VISITS`] visits) is expected back in `1 / r` of it
/// (proportional hazards). A prefetched expert is expected at the coming visit of its
/// layer.
#[derive(Debug, Clone)]
pub struct NextUseForecast {
    n_layers: usize,
    n_experts: usize,
    /// Layer visits so far, and the layer of the latest.
    step: u64,
    layer: usize,
    /// Per expert: the layer visit of its last use (`None`: never used).
    last_use: Vec<Option<u32>>,
    visits: Vec<u32>,
    /// Per layer and `a`: the count and the sum of the gaps seen longer than `a`
    /// (gaps longer than MAX_GAP count as MAX_GAP).
    longer: Vec<Vec<(u64, u64)>>,
    /// Decayed uses per expert and per layer.
    uses: Vec<DecayedCount>,
    layer_uses: Vec<DecayedCount>,
}

/// A count whose every addition halves in weight each [`NextUseForecast::HALF_LIFE`]
/// visits of its layer.
#[derive(Debug, Clone, Copy, Default)]
struct DecayedCount {
    value: f64,
    /// The layer visit `value` is as of.
    at: u32,
}

impl DecayedCount {
    fn at(self, visit: u32) -> f64 {
        self.value * (-f64::from(visit.saturating_sub(self.at)) / NextUseForecast::HALF_LIFE).exp2()
    }

    fn add(&mut self, visit: u32) {
        *self = DecayedCount {
            value: self.at(visit) + 1.0,
            at: visit,
        };
    }
}

impl NextUseForecast {
    /// Units of [`Self::next_use`] per layer step.
    pub const UNIT: f64 = 1000.0;
    const MAX_GAP: usize = 256;
    /// Visits of pseudo-evidence that an expert is used as often as its layer's average.
    pub const PRIOR_VISITS: f64 = 4.0;
    /// Visits of its layer over which a use's weight in the use rate halves (as the
    /// kept LFU's default, in tokens).
    pub const HALF_LIFE: f64 = 64.0;

    /// The most experts in all [`Self::checked`] takes (a runtime's model).
    pub const MAX_EXPERTS: usize = 1 << 24;

    /// For `n_layers x n_experts` experts, a runtime's shape checked: each from 1 to
    /// 65535 (expert ids within a layer are 16-bit) and [`Self::MAX_EXPERTS`] in all.
    pub fn checked(n_layers: usize, n_experts: usize) -> Result<Self, StagingError> {
        let each = 1..=usize::from(u16::MAX);
        let ids = n_layers.saturating_mul(n_experts);
        if !each.contains(&n_layers) || !each.contains(&n_experts) || ids > Self::MAX_EXPERTS {
            return Err(StagingError::ModelShape {
                n_moe: n_layers,
                n_experts,
            });
        }
        Ok(Self::new(n_layers, n_experts))
    }

    /// For `n_layers x n_experts` experts.
    pub fn new(n_layers: usize, n_experts: usize) -> Self {
        NextUseForecast {
            n_layers,
            n_experts,
            step: 0,
            layer: n_layers.saturating_sub(1),
            last_use: vec![None; n_layers * n_experts],
            visits: vec![0; n_layers],
            longer: vec![vec![(0, 0); Self::MAX_GAP + 1]; n_layers],
            uses: vec![DecayedCount::default(); n_layers * n_experts],
            layer_uses: vec![DecayedCount::default(); n_layers],
        }
    }

    /// Records a visit of `layer` that used the experts `used`.
    pub fn visit(&mut self, layer: usize, used: &[usize]) {
        let v = self.visits[layer];
        for &id in used {
            if let Some(last) = self.last_use[id] {
                if last < v {
                    let gap = ((v - last) as usize).min(Self::MAX_GAP);
                    for longer in &mut self.longer[layer][..gap] {
                        longer.0 += 1;
                        longer.1 += gap as u64;
                    }
                }
            }
            self.last_use[id] = Some(v);
            self.uses[id].add(v);
            self.layer_uses[layer].add(v);
        }
        self.visits[layer] += 1;
        self.step += 1;
        self.layer = layer;
    }

    /// Records a visit of MoE layer `layer` that routed to `experts` (indices within the
    /// layer, as a runtime gives them; repeats count once), checked.
    pub fn layer_routed(&mut self, layer: usize, experts: &[u16]) -> Result<(), StagingError> {
        check_layer(layer, self.n_layers)?;
        check_experts(experts, self.n_experts)?;
        let mut used = Vec::with_capacity(experts.len());
        for &expert in experts {
            let id = layer * self.n_experts + usize::from(expert);
            if !used.contains(&id) {
                used.push(id);
            }
        }
        self.visit(layer, &used);
        Ok(())
    }

    /// The estimated next use of each of layer `layer`'s experts into `out` (one per
    /// expert), in layer steps since the first visit: the resident expert with the
    /// largest goes first.
    pub fn layer_due(&self, layer: usize, out: &mut [f64]) -> Result<(), StagingError> {
        check_layer(layer, self.n_layers)?;
        if out.len() != self.n_experts {
            return Err(StagingError::LayerWidth {
                what: "out",
                got: out.len(),
                want: self.n_experts,
            });
        }
        let base = layer * self.n_experts;
        for (e, due) in out.iter_mut().enumerate() {
            *due = self.next_use(base + e) as f64 / Self::UNIT;
        }
        Ok(())
    }

    /// Experts per layer.
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    /// Estimated next use of `id`, as of its layer's latest visit.
    pub fn next_use(&self, id: usize) -> u64 {
        let l = id / self.n_experts;
        let visits = self.residual_visits(id) / self.use_rate(id);
        // The layer's latest visit was this many steps ago.
        let since = (self.layer + self.n_layers - l) % self.n_layers;
        self.at(visits * self.n_layers as f64 - since as f64)
    }

    /// How many times as often as its layer's average expert `id` was used lately
    /// (decayed uses per visit, shrunk towards 1; within 1/20 and 20).
    pub fn use_rate(&self, id: usize) -> f64 {
        let l = id / self.n_experts;
        let v = self.visits[l];
        let uses = self.layer_uses[l].at(v);
        if v == 0 || uses <= 0.0 {
            return 1.0;
        }
        let h = NextUseForecast::HALF_LIFE;
        // The decayed number of visits so far.
        let seen = (1.0 - (-f64::from(v) / h).exp2()) / (1.0 - (-1.0 / h).exp2());
        let mean = uses / (seen * self.n_experts as f64);
        let rate = (self.uses[id].at(v) / mean + Self::PRIOR_VISITS) / (seen + Self::PRIOR_VISITS);
        rate.clamp(0.05, 20.0)
    }

    /// Visits of `id`'s layer until the next use of an expert idle as long as `id`: the
    /// layer's mean residual life at that idle time.
    pub fn residual_visits(&self, id: usize) -> f64 {
        let l = id / self.n_experts;
        let v = self.visits[l];
        let idle = match self.last_use[id] {
            Some(last) => v.saturating_sub(last + 1),
            None => v,
        } as usize;
        let all = self.longer[l][0];
        match self.longer[l].get(idle) {
            Some(&(n, sum)) if n > 0 => sum as f64 / n as f64 - idle as f64,
            _ if all.0 > 0 => (all.1 as f64 / all.0 as f64).max(idle as f64),
            _ => self.n_experts as f64,
        }
    }

    /// The current step: the next use of an expert needed now.
    pub fn now(&self) -> u64 {
        self.at(0.0)
    }

    /// The next use of `id` prefetched now: the coming visit of its layer.
    pub fn prefetched(&self, id: usize) -> u64 {
        let l = id / self.n_experts;
        let ahead = (l + self.n_layers - self.layer - 1) % self.n_layers + 1;
        self.at(ahead as f64)
    }

    fn at(&self, steps_ahead: f64) -> u64 {
        ((self.step as f64 + steps_ahead.max(0.0)) * Self::UNIT) as u64
    }
}
