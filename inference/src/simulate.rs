//! Trace-driven simulation of an expert cache with prefetching, timing-honest.
//!
//! Time model (one token after another, one layer after another): at layer `l` the
//! router's experts are looked up; a resident expert whose transfer has finished is a
//! **hit**; one still in flight is a **late prefetch** (the layer waits for it); any
//! other is a **miss** and is fetched on demand. Transfers share one link and take
//! `expert_bytes / bandwidth` each; prefetches go in the order they were issued (or, with
//! `deadline_order`, earliest deadline first: the layer that needs them soonest), and a
//! demand fetch goes ahead of every prefetch that has not started yet (the one on the
//! link finishes first). Then the layer's experts compute for `compute_us_per_layer`.
//! With `attention_us_per_layer` > 0 each layer first runs attention for that long
//! before it routes (the lookup); 0 (the default) lumps all of a layer's time after it.
//!
//! Prefetches come from a [`PrefetchPlan`]: for every token, a list of experts to fetch
//! at its start (when its id is known and the previous token's routing is complete),
//! at each layer's start, before its attention (what reads the layer's input, such as
//! the pre-attention gate), and after each layer has routed. A plan may only use what exists at that moment; the
//! builders here keep to that, except the oracle, which is labelled as such. The
//! "untimed" mode makes every transfer instantaneous: a prefetch is in place right before
//! its lookup, as MoE-Beyond's hit rates assume. It is reported separately.

use datasets::TraceView;
use serde::{Deserialize, Serialize};

use crate::cache::{CacheScope, EvictionPolicy, ExpertCache, Insertion};

/// Experts to fetch per token and moment: slot 0 is the token's start, slot `l + 1`
/// follows layer `l`'s routing; optionally also at each layer's start, before its
/// attention. Ids are `layer * n_experts + expert`, best first.
#[derive(Debug, Clone, Default)]
pub struct PrefetchPlan {
    pub name: String,
    pub n_moe: usize,
    /// `[token * (n_moe + 1) + slot]`.
    pub events: Vec<Vec<u32>>,
    /// `[token * n_moe + layer]`: issued when layer `layer` starts, before its attention
    /// (absent when the plan issues nothing then).
    pub before_attention: Option<Vec<Vec<u32>>>,
}

impl PrefetchPlan {
    /// A plan with no prefetches for `n_tokens` tokens.
    pub fn empty(name: &str, n_tokens: usize, n_moe: usize) -> Self {
        PrefetchPlan {
            name: name.into(),
            n_moe,
            events: vec![Vec::new(); n_tokens * (n_moe + 1)],
            before_attention: None,
        }
    }

    /// The union of `plans` (of the same trace): each event issues the experts of every
    /// plan, in plan order, each once. Named `a+b`.
    pub fn union(plans: &[&PrefetchPlan]) -> PrefetchPlan {
        let Some(first) = plans.first() else {
            return PrefetchPlan::default();
        };
        if plans.len() == 1 {
            return (*first).clone();
        }
        let merge = |lists: Vec<&Vec<u32>>| {
            let mut out: Vec<u32> = Vec::new();
            for x in lists.into_iter().flatten() {
                if !out.contains(x) {
                    out.push(*x);
                }
            }
            out
        };
        let events = (0..first.events.len())
            .map(|i| merge(plans.iter().map(|p| &p.events[i]).collect()))
            .collect();
        let before_attention = plans.iter().any(|p| p.before_attention.is_some()).then(|| {
            let n = first.events.len() / (first.n_moe + 1) * first.n_moe;
            (0..n)
                .map(|i| {
                    merge(
                        plans
                            .iter()
                            .filter_map(|p| p.before_attention.as_ref().map(|b| &b[i]))
                            .collect(),
                    )
                })
                .collect()
        });
        PrefetchPlan {
            name: plans
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            n_moe: first.n_moe,
            events,
            before_attention,
        }
    }

    /// Mutable list of token `t` at the start of layer `layer`, before its attention.
    pub fn before_attention_mut(&mut self, t: usize, layer: usize) -> &mut Vec<u32> {
        let n = self.events.len() / (self.n_moe + 1) * self.n_moe;
        let lists = self
            .before_attention
            .get_or_insert_with(|| vec![Vec::new(); n]);
        &mut lists[t * self.n_moe + layer]
    }

    fn before_attention(&self, t: usize, layer: usize) -> &[u32] {
        self.before_attention
            .as_ref()
            .map_or(&[], |lists| &lists[t * self.n_moe + layer])
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
    /// `lru`, `lfu`, `lfu:DECAY`, `next-use` or `belady`.
    pub policy: String,
    /// Link bandwidth, GB/s.
    pub bandwidth_gbps: f64,
    /// Bytes of one expert.
    pub expert_bytes: f64,
    /// Compute time of one layer's experts (after routing), microseconds.
    pub compute_us_per_layer: f64,
    /// Attention time of one layer (before routing), microseconds.
    #[serde(default)]
    pub attention_us_per_layer: f64,
    /// Transfers take no time (MoE-Beyond's untimed hit rate).
    pub untimed: bool,
    /// Queued prefetches go earliest deadline first (the layer that needs them soonest)
    /// instead of in the order they were issued.
    #[serde(default)]
    pub deadline_order: bool,
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

/// The moving parts of one simulation.
struct Sim<'p> {
    cache: ExpertCache,
    future: Option<FutureUses>,
    xfer: f64,
    expert_bytes: f64,
    ready: Vec<f64>,
    unused_prefetch: Vec<bool>,
    /// End of the last queued transfer, and of the last demand transfer.
    link_free: f64,
    demand_free: f64,
    /// Queued prefetches as (expert, generation of its `ready` entry).
    pending: std::collections::VecDeque<(usize, u32)>,
    generation: Vec<u32>,
    now: f64,
    /// Experts that must stay for the current event.
    pinned: Vec<usize>,
    /// The next layer of the current token to look up (prefetch deadlines).
    layer: usize,
    n_experts: usize,
    deadline_order: bool,
    plan: &'p PrefetchPlan,
    r: SimReport,
}

impl Sim<'_> {
    /// Looks up the experts `ids` of layer `l`; waits for those not ready.
    fn lookup(&mut self, l: usize, e: usize, ids: &[u16]) {
        self.pinned.clear();
        let now = self.now;
        let mut wait_until = now;
        let used: Vec<usize> = ids.iter().map(|&x| l * e + x as usize).collect();
        self.cache.visit(l, &used);
        for id in used {
            self.r.accesses += 1;
            self.pinned.push(id);
            let next = self.future.as_mut().map_or(0, |f| f.advance(id));
            if self.cache.contains(id) {
                if self.unused_prefetch[id] {
                    self.unused_prefetch[id] = false;
                    self.r.useful_prefetches += 1;
                }
                if self.ready[id] <= now {
                    self.r.hits += 1;
                    self.r.per_layer[l].hits += 1;
                } else {
                    self.r.late += 1;
                    self.r.per_layer[l].late += 1;
                    wait_until = wait_until.max(self.ready[id]);
                }
                self.cache.touch(id, next);
                continue;
            }
            self.r.misses += 1;
            self.r.per_layer[l].misses += 1;
            if let Insertion::Done { evicted: Some(v) } = self.cache.insert(id, next, &self.pinned)
            {
                self.unused_prefetch[v] = false;
            }
            // Finished prefetches leave the queue; the one on the link completes; the
            // demand fetch goes before the rest.
            self.drop_finished();
            let (ready, xfer) = (&mut self.ready, self.xfer);
            let start = match self.pending.front() {
                Some(&(p, _)) if ready[p] - xfer <= now => ready[p],
                _ => now,
            }
            .max(self.demand_free);
            for &(p, _) in self.pending.iter() {
                if ready[p] - xfer >= start {
                    ready[p] += xfer;
                }
            }
            self.generation[id] = self.generation[id].wrapping_add(1);
            ready[id] = start + xfer;
            self.demand_free = ready[id];
            self.link_free = self.link_free.max(now) + xfer;
            self.r.bytes_demand += self.expert_bytes;
            wait_until = wait_until.max(ready[id]);
        }
        self.r.stall_us += wait_until - now;
        self.now = wait_until;
    }

    /// Queues prefetches of `ids` (a planned expert already resident stays pinned).
    fn prefetch(&mut self, ids: &[u32]) {
        let n_ids = self.ready.len();
        for &pid in ids {
            let id = pid as usize;
            if id >= n_ids {
                continue;
            }
            if self.cache.contains(id) {
                self.cache.expect(id);
                self.pinned.push(id);
                continue;
            }
            let next = self.future.as_ref().map_or(0, |f| f.next(id));
            match self.cache.insert(id, next, &self.pinned) {
                Insertion::Done { evicted: Some(v) } => self.unused_prefetch[v] = false,
                Insertion::Done { evicted: None } => {}
                Insertion::AllPinned => continue,
            }
            self.cache.expect(id);
            self.unused_prefetch[id] = true;
            self.pinned.push(id);
            let start = self.now.max(self.link_free);
            self.ready[id] = start + self.xfer;
            self.link_free = self.ready[id];
            self.generation[id] = self.generation[id].wrapping_add(1);
            self.pending.push_back((id, self.generation[id]));
            self.r.prefetches += 1;
            self.r.bytes_prefetch += self.expert_bytes;
        }
        if self.deadline_order {
            self.reorder();
        }
    }

    /// Earliest deadline first: the queued prefetches that have not started go in the
    /// order of the layer that needs them (this token's coming layers first, layers it
    /// has passed last), back to back after the transfers already on the link.
    fn reorder(&mut self) {
        self.drop_finished();
        let (now, xfer, e, layer) = (self.now, self.xfer, self.n_experts, self.layer);
        let ready = &mut self.ready;
        let started = self
            .pending
            .iter()
            .take_while(|&&(p, _)| ready[p] - xfer < now)
            .count();
        let mut start = self
            .pending
            .iter()
            .take(started)
            .map(|&(p, _)| ready[p])
            .fold(now.max(self.demand_free), f64::max);
        let mut waiting: Vec<(usize, u32)> = self.pending.drain(started..).collect();
        if waiting.is_empty() {
            return;
        }
        waiting.sort_by_key(|&(p, _)| (p / e < layer, p / e));
        for &(p, _) in &waiting {
            start += xfer;
            ready[p] = start;
        }
        self.link_free = start;
        self.pending.extend(waiting);
    }

    /// Forgets queued prefetches that have finished or whose expert was re-fetched.
    fn drop_finished(&mut self) {
        let (now, ready, generation) = (self.now, &self.ready, &self.generation);
        self.pending
            .retain(|&(p, g)| generation[p] == g && ready[p] > now);
    }

    fn compute(&mut self, us: f64) {
        self.now += us;
        self.r.compute_us += us;
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
    let cache = ExpertCache::new(policy, scope, cfg.capacity, m, e);
    let r = SimReport {
        policy: cfg.policy.clone(),
        prefetch: plan.name.clone(),
        capacity: cache.capacity(),
        untimed: cfg.untimed,
        per_layer: vec![LayerOutcomes::default(); m],
        ..SimReport::default()
    };
    let mut sim = Sim {
        cache,
        // Next-use times only matter to Belady.
        future: (policy == EvictionPolicy::Belady).then(|| FutureUses::new(view, sequences, n_ids)),
        xfer: if cfg.untimed {
            0.0
        } else {
            cfg.expert_bytes / (cfg.bandwidth_gbps * 1e3)
        },
        expert_bytes: cfg.expert_bytes,
        ready: vec![0.0; n_ids],
        unused_prefetch: vec![false; n_ids],
        link_free: 0.0,
        demand_free: 0.0,
        pending: std::collections::VecDeque::new(),
        generation: vec![0; n_ids],
        now: 0.0,
        pinned: Vec::with_capacity(16),
        layer: 0,
        n_experts: e,
        deadline_order: cfg.deadline_order,
        plan,
        r,
    };
    for seq in sequences {
        for t in seq.clone() {
            sim.r.tokens += 1;
            sim.pinned.clear();
            sim.layer = 0;
            sim.prefetch(sim.plan.at(t, 0));
            for l in 0..m {
                let Some(ids) = view.layer(t, l) else {
                    continue;
                };
                sim.pinned.clear();
                sim.layer = l;
                sim.prefetch(sim.plan.before_attention(t, l));
                sim.compute(cfg.attention_us_per_layer);
                sim.lookup(l, e, ids);
                sim.layer = l + 1;
                sim.prefetch(sim.plan.at(t, l + 1));
                sim.compute(cfg.compute_us_per_layer);
            }
        }
    }
    Ok(sim.r)
}
