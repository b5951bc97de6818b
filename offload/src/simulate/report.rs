//! [`SimReport`]: what one simulation measured.

use serde::{Deserialize, Serialize};

/// What one simulation measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub policy: String,
    pub prefetch: String,
    /// Prefetch budget: experts per forecast layer, `auto` (the planner) or `-` (none
    /// or the oracle).
    #[serde(default)]
    pub budget: String,
    pub capacity: usize,
    pub untimed: bool,
    pub tokens: u64,
    pub accesses: u64,
    pub hits: u64,
    /// Resident but still in flight when needed.
    pub late: u64,
    pub misses: u64,
    pub prefetches: u64,
    /// Prefetched experts that were used before being evicted.
    pub useful_prefetches: u64,
    pub bytes_demand: f64,
    pub bytes_prefetch: f64,
    pub stall_us: f64,
    pub compute_us: f64,
    /// Time demand reads waited for a prefetch transfer on the link.
    #[serde(default)]
    pub demand_wait_us: f64,
    /// The planner's decisions (planned prefetch only).
    #[serde(default)]
    pub planner: Option<crate::planner::PlannerCounts>,
    /// Per MoE layer: hits, late and misses (where the misses are).
    #[serde(default)]
    pub per_layer: Vec<LayerOutcomes>,
}

/// Lookup outcomes at one MoE layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerOutcomes {
    pub hits: u64,
    pub late: u64,
    pub misses: u64,
}

impl SimReport {
    /// Hits over accesses (late prefetches are not hits).
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / self.accesses.max(1) as f64
    }

    /// Modelled decode throughput.
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / ((self.stall_us + self.compute_us) / 1e6).max(1e-12)
    }

    /// Mean stall per token, microseconds.
    pub fn stall_us_per_token(&self) -> f64 {
        self.stall_us / self.tokens.max(1) as f64
    }

    /// Adds the counters of `other` (another piece of the same configuration).
    pub fn merge(&mut self, other: &SimReport) {
        self.tokens += other.tokens;
        self.accesses += other.accesses;
        self.hits += other.hits;
        self.late += other.late;
        self.misses += other.misses;
        self.prefetches += other.prefetches;
        self.useful_prefetches += other.useful_prefetches;
        self.bytes_demand += other.bytes_demand;
        self.bytes_prefetch += other.bytes_prefetch;
        self.stall_us += other.stall_us;
        self.compute_us += other.compute_us;
        self.demand_wait_us += other.demand_wait_us;
        if let Some(b) = &other.planner {
            let a = self.planner.get_or_insert_with(Default::default);
            a.offered += b.offered;
            a.issued += b.issued;
            a.late += b.late;
            a.not_worth += b.not_worth;
            a.cancelled += b.cancelled;
        }
        if self.per_layer.len() < other.per_layer.len() {
            self.per_layer
                .resize(other.per_layer.len(), LayerOutcomes::default());
        }
        for (a, b) in self.per_layer.iter_mut().zip(&other.per_layer) {
            a.hits += b.hits;
            a.late += b.late;
            a.misses += b.misses;
        }
    }
}
