//! [`EngineReport`]: what a run of the offloading engine measured.

use serde::{Deserialize, Serialize};

use crate::cache::EvictionPolicy;

/// What a run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineReport {
    pub policy: String,
    pub prefetch: String,
    /// The prefetchers in a word each, for charts (`learned+lens`, `oracle 3`); empty
    /// without prefetch and in reports written before it.
    #[serde(default)]
    pub prefetch_short: String,
    /// Experts per forecast layer, or `auto` (the planner).
    #[serde(default)]
    pub budget: String,
    pub capacity: usize,
    pub total_experts: usize,
    pub routing_margin: f32,
    pub prompt_tokens: u64,
    pub decode_tokens: u64,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Expert lookups in decode steps (token x layer x k).
    pub accesses: u64,
    pub hits: u64,
    pub late: u64,
    pub misses: u64,
    /// Decode time spent waiting for expert reads.
    pub stall_s: f64,
    pub prefetches: u64,
    /// Prefetched experts used before eviction.
    pub useful_prefetches: u64,
    /// Reads finished, and bytes read, on demand and for prefetches (prompt included).
    pub demand_reads: u64,
    pub prefetch_reads: u64,
    pub bytes_demand: u64,
    pub bytes_prefetch: u64,
    /// Prefetch reads that arrived after their expert had been evicted.
    pub wasted_reads: u64,
    /// Demand reads that arrived after their expert had been evicted (read again when
    /// the forward reached it).
    #[serde(default)]
    pub wasted_demand_reads: u64,
    /// Prefetches stopped part-read when their layer routed without them (their bytes
    /// are in `bytes_prefetch`; they are not in `prefetch_reads`).
    #[serde(default)]
    pub stopped_reads: u64,
    /// Seconds the loader threads spent reading (they overlap compute).
    pub read_s: f64,
    /// (token, layer) routings where cache-aware routing changed the expert set, of all.
    pub rerouted: u64,
    pub routings: u64,
    /// Decode steps the prefetch guard ran without prefetch (it measured prefetch not to
    /// pay, or was measuring that), or the alternation ran without it.
    #[serde(default)]
    pub prefetch_off_tokens: u64,
    /// Every decode step's time, milliseconds, in order.
    #[serde(default)]
    pub step_ms: Vec<f32>,
    /// The measured windows of the prefetch guard or the alternation, in order: prefetch
    /// on, mean decode step seconds.
    #[serde(default, alias = "guard_windows")]
    pub prefetch_windows: Vec<(bool, f64)>,
    /// Prefetch ran on and off in alternate windows of this many decode steps (0: not
    /// alternated; tokens/s then mixes both settings).
    #[serde(default)]
    pub alternate_window: usize,
    /// The planner's decisions (planned prefetch only).
    #[serde(default)]
    pub planner: Option<crate::planner::PlannerCounts>,
    /// What the planner planned with at the run's end: measured timings, learned link
    /// and cache statistics (planned prefetch only).
    #[serde(default)]
    pub planner_state: Option<crate::planner::PlannerState>,
    /// Experts were read with direct I/O (else buffered, dropped from the page cache).
    #[serde(default)]
    pub direct_io: bool,
}

impl EngineReport {
    /// Hits over decode lookups.
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / self.accesses.max(1) as f64
    }

    /// Decode throughput.
    pub fn tokens_per_s(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_s.max(1e-12)
    }

    /// How much longer decode steps without prefetch took than those with it, in this
    /// run (from the guard's windows or the alternation's).
    pub fn paired_prefetch(&self) -> Option<super::PairedEstimate> {
        super::PairedEstimate::from_windows(&self.prefetch_windows)
    }

    /// Mean decode stall per token, milliseconds.
    pub fn stall_ms_per_token(&self) -> f64 {
        self.stall_s * 1e3 / self.decode_tokens.max(1) as f64
    }
}

/// The prefetchers a run combines, from (in use, as the report names it, in a word):
/// their names joined (`none` without any), and their words joined.
pub(super) fn prefetch_names(parts: &[(bool, &str, &str)]) -> (String, String) {
    let on: Vec<_> = parts.iter().filter(|p| p.0).collect();
    if on.is_empty() {
        return ("none".into(), String::new());
    }
    let names: Vec<&str> = on.iter().map(|p| p.1).collect();
    let words: Vec<&str> = on.iter().map(|p| p.2).collect();
    (names.join(" + "), words.join("+"))
}

/// The policy as `--policy` spells it.
pub(super) fn policy_name(p: EvictionPolicy) -> String {
    match p {
        EvictionPolicy::Lru => "lru".into(),
        EvictionPolicy::Lfu { decay: 0.0 } => "lfu".into(),
        EvictionPolicy::Lfu { decay } => format!("lfu:{decay}"),
        EvictionPolicy::LfuKept { half_life } if half_life == EvictionPolicy::HALF_LIFE => {
            "lfu-kept".into()
        }
        EvictionPolicy::LfuKept { half_life } => format!("lfu-kept:{half_life}"),
        EvictionPolicy::Belady => "belady".into(),
        EvictionPolicy::NextUse => "next-use".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::prefetch_names;

    #[test]
    fn prefetchers_are_named_in_full_and_in_a_word_each() {
        let parts = |lens| {
            [
                (true, "learned (next token)", "learned"),
                (false, "token table", "token"),
                (lens, "logit lens", "lens"),
            ]
        };
        assert_eq!(
            prefetch_names(&parts(true)),
            (
                "learned (next token) + logit lens".to_string(),
                "learned+lens".to_string()
            )
        );
        assert_eq!(
            prefetch_names(&parts(false)),
            ("learned (next token)".to_string(), "learned".to_string())
        );
        assert_eq!(
            prefetch_names(&[(false, "token table", "token")]),
            ("none".to_string(), String::new())
        );
    }
}
