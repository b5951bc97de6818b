//! Trace-driven simulation of an expert cache with prefetching, timing-honest.
//!
//! Time model (one token after another, one layer after another): at layer `l` the
//! router's experts are looked up; a resident expert whose transfer has finished is a
//! **hit**; one still in flight is a **late prefetch** (the layer waits for it); any
//! other is a **miss** and is fetched on demand. Transfers share one link and take
//! `expert_bytes / bandwidth` each; prefetches go in the order they were issued, and a
//! demand fetch goes ahead of every prefetch that has not started yet (the one on the
//! link finishes first). Then the layer computes for `compute_us_per_layer`.
//!
//! Prefetches come from a [`PrefetchPlan`]: for every token, a list of experts to fetch
//! at its start (when its id is known and the previous token's routing is complete) and
//! after each layer has routed. A plan may only use what exists at that moment; the
//! builders here keep to that, except the oracle, which is labelled as such. The
//! "untimed" mode makes every transfer instantaneous: a prefetch is in place right before
//! its lookup, as MoE-Beyond's hit rates assume. It is reported separately.

use datasets::TraceView;
use serde::{Deserialize, Serialize};

use crate::cache::{CacheScope, EvictionPolicy, ExpertCache, Insertion};

/// Experts to fetch per token and moment: slot 0 is the token's start, slot `l + 1`
/// follows layer `l`'s routing. Ids are `layer * n_experts + expert`, best first.
#[derive(Debug, Clone, Default)]
pub struct PrefetchPlan {
    pub name: String,
    pub n_moe: usize,
    /// `[token * (n_moe + 1) + slot]`.
    pub events: Vec<Vec<u32>>,
}

impl PrefetchPlan {
    /// A plan with no prefetches for `n_tokens` tokens.
    pub fn empty(name: &str, n_tokens: usize, n_moe: usize) -> Self {
        PrefetchPlan {
            name: name.into(),
            n_moe,
            events: vec![Vec::new(); n_tokens * (n_moe + 1)],
        }
    }

    /// The list of token `t` at `slot`.
    pub fn at(&self, t: usize, slot: usize) -> &[u32] {
        &self.events[t * (self.n_moe + 1) + slot]
    }

    /// Mutable list of token `t` at `slot`.
    pub fn at_mut(&mut self, t: usize, slot: usize) -> &mut Vec<u32> {
        &mut self.events[t * (self.n_moe + 1) + slot]
    }
}

/// Cache and timing parameters of one simulation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimConfig {
    /// Resident experts in all layers together.
    pub capacity: usize,
    pub per_layer: bool,
    /// `lru`, `lfu`, `lfu:DECAY` or `belady`.
    pub policy: String,
    /// Link bandwidth, GB/s.
    pub bandwidth_gbps: f64,
    /// Bytes of one expert.
    pub expert_bytes: f64,
    /// Compute time of one layer, microseconds.
    pub compute_us_per_layer: f64,
    /// Transfers take no time (MoE-Beyond's untimed hit rate).
    pub untimed: bool,
}

/// What one simulation measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub policy: String,
    pub prefetch: String,
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
    }
}

/// For Belady: the access positions of every expert, and a cursor per expert.
struct FutureUses {
    positions: Vec<Vec<u64>>,
    cursor: Vec<usize>,
}

impl FutureUses {
    fn new(view: &TraceView<'_>, tokens: &[std::ops::Range<usize>], n_ids: usize) -> Self {
        let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
        let mut positions = vec![Vec::new(); n_ids];
        let mut n = 0u64;
        for r in tokens {
            for t in r.clone() {
                for l in 0..m {
                    if let Some(ids) = view.layer(t, l) {
                        for &x in ids {
                            positions[l * e + x as usize].push(n);
                            n += 1;
                        }
                    }
                }
            }
        }
        FutureUses {
            positions,
            cursor: vec![0; n_ids],
        }
    }

    /// Consumes the current use of `id`; returns its next use.
    fn advance(&mut self, id: usize) -> u64 {
        self.cursor[id] += 1;
        self.next(id)
    }

    fn next(&self, id: usize) -> u64 {
        self.positions[id]
            .get(self.cursor[id])
            .copied()
            .unwrap_or(u64::MAX)
    }
}

/// Runs the tokens `sequences` of `view` through a cache with `plan`'s prefetches.
pub fn simulate(
    view: &TraceView<'_>,
    sequences: &[std::ops::Range<usize>],
    plan: &PrefetchPlan,
    cfg: &SimConfig,
) -> Result<SimReport, String> {
    let policy: EvictionPolicy = cfg.policy.parse()?;
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    let n_ids = m * e;
    if cfg.capacity == 0 {
        return Err("cache capacity must be at least one expert".into());
    }
    let scope = if cfg.per_layer {
        CacheScope::PerLayer
    } else {
        CacheScope::Global
    };
    let mut cache = ExpertCache::new(policy, scope, cfg.capacity, m, e);
    // Next-use times only matter to Belady.
    let mut future =
        (policy == EvictionPolicy::Belady).then(|| FutureUses::new(view, sequences, n_ids));
    let xfer = if cfg.untimed {
        0.0
    } else {
        cfg.expert_bytes / (cfg.bandwidth_gbps * 1e3)
    };
    let mut ready = vec![0f64; n_ids];
    let mut unused_prefetch = vec![false; n_ids];
    // End of the last queued transfer, and of the last demand transfer.
    let mut link_free = 0f64;
    let mut demand_free = 0f64;
    // Queued prefetches as (expert, generation of its `ready` entry).
    let mut pending: std::collections::VecDeque<(usize, u32)> = std::collections::VecDeque::new();
    let mut generation = vec![0u32; n_ids];
    let mut now = 0f64;
    let mut r = SimReport {
        policy: cfg.policy.clone(),
        prefetch: plan.name.clone(),
        capacity: cache.capacity(),
        untimed: cfg.untimed,
        ..SimReport::default()
    };
    let mut pinned: Vec<usize> = Vec::with_capacity(16);
    for seq in sequences {
        for t in seq.clone() {
            r.tokens += 1;
            for slot in 0..=m {
                if slot > 0 {
                    let l = slot - 1;
                    pinned.clear();
                    let Some(ids) = view.layer(t, l) else {
                        continue;
                    };
                    let mut wait_until = now;
                    for &x in ids {
                        let id = l * e + x as usize;
                        r.accesses += 1;
                        pinned.push(id);
                        let next = future.as_mut().map_or(0, |f| f.advance(id));
                        if cache.contains(id) {
                            if unused_prefetch[id] {
                                unused_prefetch[id] = false;
                                r.useful_prefetches += 1;
                            }
                            if ready[id] <= now {
                                r.hits += 1;
                            } else {
                                r.late += 1;
                                wait_until = wait_until.max(ready[id]);
                            }
                            cache.touch(id, next);
                        } else {
                            r.misses += 1;
                            if let Insertion::Done { evicted: Some(v) } =
                                cache.insert(id, next, &pinned)
                            {
                                unused_prefetch[v] = false;
                            }
                            // Finished prefetches leave the queue; the one on the link
                            // completes; the demand fetch goes before the rest.
                            pending.retain(|&(p, g)| generation[p] == g && ready[p] > now);
                            let start = match pending.front() {
                                Some(&(p, _)) if ready[p] - xfer <= now => ready[p],
                                _ => now,
                            }
                            .max(demand_free);
                            for &(p, _) in pending.iter() {
                                if ready[p] - xfer >= start {
                                    ready[p] += xfer;
                                }
                            }
                            generation[id] = generation[id].wrapping_add(1);
                            ready[id] = start + xfer;
                            demand_free = ready[id];
                            link_free = link_free.max(now) + xfer;
                            r.bytes_demand += cfg.expert_bytes;
                            wait_until = wait_until.max(ready[id]);
                        }
                    }
                    r.stall_us += wait_until - now;
                    now = wait_until;
                }
                if slot == 0 {
                    pinned.clear();
                }
                for &pid in plan.at(t, slot) {
                    let id = pid as usize;
                    if id >= n_ids {
                        continue;
                    }
                    // A planned expert that is already resident stays for this event.
                    if cache.contains(id) {
                        pinned.push(id);
                        continue;
                    }
                    let next = future.as_ref().map_or(0, |f| f.next(id));
                    match cache.insert(id, next, &pinned) {
                        Insertion::Done { evicted: Some(v) } => unused_prefetch[v] = false,
                        Insertion::Done { evicted: None } => {}
                        Insertion::AllPinned => continue,
                    }
                    unused_prefetch[id] = true;
                    pinned.push(id);
                    let start = now.max(link_free);
                    ready[id] = start + xfer;
                    link_free = ready[id];
                    generation[id] = generation[id].wrapping_add(1);
                    pending.push_back((id, generation[id]));
                    r.prefetches += 1;
                    r.bytes_prefetch += cfg.expert_bytes;
                }
                if slot > 0 {
                    now += cfg.compute_us_per_layer;
                    r.compute_us += cfg.compute_us_per_layer;
                }
            }
        }
    }
    Ok(r)
}
