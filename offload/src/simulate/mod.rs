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
//! the pre-attention gate), and after each layer has routed. A plan may only use what
//! exists at that moment; the builders here keep to that, except the oracle, which is
//! labelled as such.
//!
//! With `planned`, the [`PrefetchPlanner`] judges every expert of the plan against the
//! link (see there); prefetch reads then go in `chunk_bytes` chunks, so a demand read
//! waits at most one chunk, and a queued read whose layer routed without it is
//! cancelled. A queued prefetch of an expert its layer now needs becomes a demand read.
//! The "untimed" mode makes every transfer instantaneous: a prefetch is in place right before
//! its lookup, as MoE-Beyond's hit rates assume. It is reported separately.

mod future;
mod plan;
mod report;
pub mod study;

use future::FutureUses;

pub use plan::PrefetchPlan;
pub use report::{LayerOutcomes, SimReport};

use std::collections::VecDeque;

use datasets::TraceView;
use serde::{Deserialize, Serialize};

use crate::cache::{CacheScope, EvictionPolicy, ExpertCache, Insertion};
use crate::planner::{
    lookups_until, Candidate, LinkState, PlannerSettings, PrefetchPlanner, Verdict,
};

/// Cache and timing parameters of one simulation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimConfig {
    /// Resident experts in all layers together.
    pub capacity: usize,
    pub per_layer: bool,
    /// `lru`, `lfu`, `lfu:DECAY`, `lfu-kept`, `lfu-kept:TOKENS`, `next-use` or `belady`.
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
    /// Prefetch reads go in chunks of this many bytes and a demand read waits only for
    /// the chunk on the link (0: whole experts, a demand read waits for the read on the
    /// link to finish).
    #[serde(default)]
    pub chunk_bytes: f64,
    /// Plan prefetches against the link ([`PrefetchPlanner`]): each forecast expert is
    /// read only when it pays, and queued reads of a layer that routed elsewhere are
    /// cancelled. Off: every planned expert is read.
    #[serde(default)]
    pub planned: bool,
}

/// A read on the link or queued for it.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    id: usize,
    /// Generation of `id`'s `ready` entry when queued.
    generation: u32,
    start: f64,
    end: f64,
    /// The token it was read for (planned reads; `usize::MAX` otherwise).
    token: usize,
}

impl Transfer {
    /// When the chunk on the link at `now` ends (`chunk`: its duration).
    fn chunk_end(&self, now: f64, chunk: f64) -> f64 {
        (self.start + ((now - self.start) / chunk).ceil() * chunk).min(self.end)
    }
}

/// The moving parts of one simulation.
struct Sim {
    cache: ExpertCache,
    future: Option<FutureUses>,
    xfer: f64,
    /// Duration of one prefetch chunk (`None`: whole reads).
    chunk_us: Option<f64>,
    expert_bytes: f64,
    ready: Vec<f64>,
    unused_prefetch: Vec<bool>,
    /// End of the last queued transfer, and of the last demand transfer.
    link_free: f64,
    demand_free: f64,
    /// Queued prefetches, in link order; only the first may be on the link.
    pending: VecDeque<Transfer>,
    generation: Vec<u32>,
    now: f64,
    /// Experts that must stay for the current event.
    pinned: Vec<usize>,
    /// The experts of the current lookup.
    needed: Vec<usize>,
    /// The next layer of the current token to look up (prefetch deadlines).
    layer: usize,
    token: usize,
    n_experts: usize,
    n_moe: usize,
    deadline_order: bool,
    planner: Option<PrefetchPlanner>,
    r: SimReport,
}

impl Sim {
    /// Looks up the experts `ids` of layer `l`; waits for those not ready.
    fn lookup(&mut self, l: usize, e: usize, ids: &[u16]) {
        self.pinned.clear();
        let now = self.now;
        let used: Vec<usize> = ids.iter().map(|&x| l * e + x as usize).collect();
        self.cache.visit(l, &used);
        self.needed.clone_from(&used);
        if self.planner.is_some() {
            self.cancel_losers(l, &used);
        }
        let mut demand_reads = 0;
        for &id in &used {
            self.r.accesses += 1;
            self.pinned.push(id);
            let next = self.future.as_mut().map_or(0, |f| f.advance(id));
            if self.cache.contains(id) {
                let prefetched = self.unused_prefetch[id];
                if prefetched {
                    self.unused_prefetch[id] = false;
                    self.r.useful_prefetches += 1;
                }
                if self.ready[id] <= now {
                    self.r.hits += 1;
                    self.r.per_layer[l].hits += 1;
                } else {
                    self.r.late += 1;
                    self.r.per_layer[l].late += 1;
                    self.promote(id);
                }
                self.cache.touch(id, next);
                continue;
            }
            self.r.misses += 1;
            self.r.per_layer[l].misses += 1;
            demand_reads += 1;
            if let Insertion::Done { evicted: Some(v) } = self.cache.insert(id, next, &self.pinned)
            {
                self.unused_prefetch[v] = false;
            }
            self.demand_read(id);
            self.r.bytes_demand += self.expert_bytes;
        }
        // Every expert of the layer must be in place (later demand reads may have pushed
        // queued ones back).
        let wait_until = used.iter().map(|&id| self.ready[id]).fold(now, f64::max);
        self.r.stall_us += wait_until - now;
        self.now = wait_until;
        if let Some(p) = self.planner.as_mut() {
            p.observe_layer(l, &used, demand_reads);
        }
    }

    /// A queued prefetch of `id` that has not started becomes a demand read.
    fn promote(&mut self, id: usize) {
        self.drop_finished();
        let now = self.now;
        let Some(i) = self
            .pending
            .iter()
            .position(|tr| tr.id == id && tr.start > now)
        else {
            return;
        };
        self.pending.remove(i);
        self.demand_read(id);
    }

    /// Schedules a demand read of `id`: it goes before every queued prefetch; the one on
    /// the link finishes first (chunked: its current chunk; the rest follows).
    fn demand_read(&mut self, id: usize) {
        self.drop_finished();
        let now = self.now;
        let free = now.max(self.demand_free);
        let mut start = free;
        let xfer = self.xfer;
        let needed = &self.needed;
        let mut waited_for_needed = 0.0;
        if let Some(f) = self.pending.front_mut().filter(|f| f.start <= now) {
            // A read this lookup needs is not interrupted.
            let cut = match self.chunk_us {
                Some(c) if c > 0.0 && !needed.contains(&f.id) => f.chunk_end(now, c),
                _ => f.end,
            };
            start = start.max(cut);
            // Waiting for a read this lookup needs is not a delay prefetching caused.
            if needed.contains(&f.id) {
                waited_for_needed = start - free;
            }
            if cut < f.end {
                // Interrupted: the rest goes after the demand reads (repacked below).
                let rest = f.end - cut;
                f.start = start + xfer;
                f.end = f.start + rest;
            }
        }
        self.r.demand_wait_us += start - free - waited_for_needed;
        self.generation[id] = self.generation[id].wrapping_add(1);
        self.ready[id] = start + xfer;
        self.demand_free = self.ready[id];
        self.repack();
    }

    /// Queued prefetches that have not started go back to back after the one on the
    /// link and the demand reads.
    fn repack(&mut self) {
        let now = self.now;
        let mut t = now.max(self.demand_free);
        for tr in self.pending.iter_mut() {
            if tr.start <= now {
                t = t.max(tr.end);
                continue;
            }
            let d = tr.end - tr.start;
            tr.start = t;
            tr.end = t + d;
            t = tr.end;
            self.ready[tr.id] = tr.end;
        }
        self.link_free = t;
    }

    /// Cancels the reads planned for this token's layers up to `l` that `l`'s routing
    /// (`used`) did not need: queued ones leave the queue, the one on the link stops at
    /// the end of its chunk.
    fn cancel_losers(&mut self, l: usize, used: &[usize]) {
        self.drop_finished();
        let (now, e, token) = (self.now, self.n_experts, self.token);
        let loses = |tr: &Transfer| tr.token == token && tr.id / e <= l && !used.contains(&tr.id);
        let mut lost = Vec::new();
        if let Some(f) = self
            .pending
            .front_mut()
            .filter(|f| f.start <= now && loses(f))
        {
            let cut = f.chunk_end(now, self.chunk_us.unwrap_or(self.xfer).max(1e-12));
            // It keeps the link until `cut`, then is gone.
            lost.push((f.id, (f.end - cut) / self.xfer.max(1e-12)));
            f.end = cut;
            self.ready[f.id] = cut;
        }
        self.pending.retain(|tr| {
            let lose = tr.start > now && loses(tr);
            if lose {
                lost.push((tr.id, (tr.end - tr.start) / self.xfer.max(1e-12)));
            }
            !lose
        });
        if lost.is_empty() {
            return;
        }
        for &(id, share) in &lost {
            self.cache.remove(id);
            self.unused_prefetch[id] = false;
            if share >= 1.0 - 1e-9 {
                self.r.prefetches -= 1;
            }
            self.r.bytes_prefetch -= self.expert_bytes * share.min(1.0);
        }
        if let Some(p) = self.planner.as_mut() {
            p.counts.cancelled += lost.len() as u64;
        }
        self.repack();
    }

    /// The layer of a forecast expert relative to the next lookup, and its token.
    fn target(&self, id: usize) -> (usize, usize) {
        let (ahead, next_token) = lookups_until(id / self.n_experts, self.layer, self.n_moe);
        (ahead, self.token + usize::from(next_token))
    }

    /// One prefetch moment: the plan's `ids` (with `probs`, if it has them), the next
    /// lookup expected at `next_lookup`.
    fn offer(&mut self, ids: &[u32], probs: Option<&[f32]>, next_lookup: f64) {
        match self.planner.take() {
            None => {
                for &id in ids {
                    if (id as usize) < self.ready.len() {
                        self.prefetch(id as usize, usize::MAX);
                    }
                }
            }
            Some(mut planner) => {
                self.planned_prefetch(&mut planner, ids, probs, next_lookup);
                self.planner = Some(planner);
            }
        }
        if self.deadline_order {
            self.reorder();
        }
    }

    fn planned_prefetch(
        &mut self,
        planner: &mut PrefetchPlanner,
        ids: &[u32],
        probs: Option<&[f32]>,
        next_lookup: f64,
    ) {
        let mut rank = vec![0usize; self.n_moe];
        let mut offered: Vec<(f64, Candidate)> = Vec::with_capacity(ids.len());
        for (j, &id) in ids.iter().enumerate() {
            if id as usize >= self.ready.len() {
                continue;
            }
            let l = id as usize / self.n_experts;
            let c = Candidate {
                id,
                layers_ahead: self.target(id as usize).0,
                horizon: self.target(id as usize).0,
                prob: probs.and_then(|p| p.get(j)).copied().unwrap_or(f32::NAN),
                rank: rank[l],
            };
            rank[l] += 1;
            planner.note_offered(&c);
            offered.push((planner.calibrated(&c), c));
        }
        // Candidates not worth a read at an earlier moment are judged again now.
        planner.merge_deferred(&mut offered, self.token as u64, self.layer);
        // When the link is free for a read `a` layers ahead: after the demand reads, the
        // read on the link and the queued reads that go before it (earliest deadline
        // first: those for layers up to `a`; in issue order: all).
        self.drop_finished();
        let now = self.now;
        let mut busy = vec![now.max(self.demand_free); self.n_moe + 1];
        for tr in &self.pending {
            let from = if tr.start <= now || !self.deadline_order {
                0
            } else {
                self.target(tr.id).0.min(self.n_moe)
            };
            let d = if tr.start <= now {
                tr.end - now
            } else {
                tr.end - tr.start
            };
            busy[from..].iter_mut().for_each(|b| *b += d);
        }
        for (_, c) in offered {
            let id = c.id as usize;
            if self.cache.contains(id) {
                self.cache.expect(id);
                self.pinned.push(id);
                continue;
            }
            let (victim, background) = match self.cache.victim(id, &self.pinned) {
                None => continue,
                Some(None) => (0.0, None),
                Some(Some(v)) => match planner.victim_probability(v as u32) {
                    (p, false) => (p, None),
                    (p, true) => (p, Some(v as u32)),
                },
            };
            let ahead = c.layers_ahead.min(self.n_moe);
            let link = LinkState {
                now,
                link_free: busy[ahead],
                next_lookup,
            };
            let token = self.target(id).1;
            let verdict = planner.judge(&c, &link, victim);
            if verdict == Verdict::NotWorth {
                planner.defer(c, token as u64);
            }
            if verdict == Verdict::Issue {
                self.prefetch(id, token);
                if let Some(v) = background {
                    planner.note_evicted(v);
                }
                let from = if self.deadline_order { ahead } else { 0 };
                busy[from..].iter_mut().for_each(|b| *b += self.xfer);
            }
        }
    }

    /// Queues a prefetch of `id` for `token` (a planned expert already resident stays
    /// pinned).
    fn prefetch(&mut self, id: usize, token: usize) {
        if self.cache.contains(id) {
            self.cache.expect(id);
            self.pinned.push(id);
            return;
        }
        let next = self.future.as_ref().map_or(0, |f| f.next(id));
        match self.cache.stage(id, next, &self.pinned) {
            Insertion::Done { evicted: Some(v) } => self.unused_prefetch[v] = false,
            Insertion::Done { evicted: None } => {}
            Insertion::AllPinned => return,
        }
        self.cache.expect(id);
        self.unused_prefetch[id] = true;
        self.pinned.push(id);
        let start = self.now.max(self.link_free);
        self.ready[id] = start + self.xfer;
        self.link_free = self.ready[id];
        self.generation[id] = self.generation[id].wrapping_add(1);
        self.pending.push_back(Transfer {
            id,
            generation: self.generation[id],
            start,
            end: self.ready[id],
            token,
        });
        self.r.prefetches += 1;
        self.r.bytes_prefetch += self.expert_bytes;
    }

    /// Earliest deadline first: the queued prefetches that have not started go in the
    /// order of the layer that needs them (this token's coming layers first, layers it
    /// has passed last), back to back after the transfers already on the link.
    fn reorder(&mut self) {
        self.drop_finished();
        let (now, e, layer) = (self.now, self.n_experts, self.layer);
        let started = self.pending.iter().take_while(|tr| tr.start <= now).count();
        if started == self.pending.len() {
            return;
        }
        let mut waiting: Vec<Transfer> = self.pending.drain(started..).collect();
        waiting.sort_by_key(|tr| (tr.id / e < layer, tr.id / e));
        self.pending.extend(waiting);
        self.repack();
    }

    /// Forgets queued prefetches that have finished or whose expert was re-fetched.
    fn drop_finished(&mut self) {
        let (now, generation) = (self.now, &self.generation);
        self.pending
            .retain(|tr| generation[tr.id] == tr.generation && tr.end > now);
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
    if cfg.chunk_bytes.is_nan() || cfg.chunk_bytes < 0.0 {
        return Err("prefetch chunk size must not be negative".into());
    }
    let scope = if cfg.per_layer {
        CacheScope::PerLayer
    } else {
        CacheScope::Global
    };
    let cache = ExpertCache::new(policy, scope, cfg.capacity, m, e);
    let xfer = if cfg.untimed {
        0.0
    } else {
        cfg.expert_bytes / (cfg.bandwidth_gbps * 1e3)
    };
    let chunk_us = (cfg.chunk_bytes > 0.0 && !cfg.untimed)
        .then(|| cfg.chunk_bytes.min(cfg.expert_bytes) / (cfg.bandwidth_gbps * 1e3));
    let planner = cfg.planned.then(|| {
        PrefetchPlanner::new(PlannerSettings {
            read_us: xfer,
            chunk_us: chunk_us.unwrap_or(xfer),
            layer_period_us: cfg.attention_us_per_layer + cfg.compute_us_per_layer,
            top_k: view.meta.top_k as usize,
            n_experts: e,
            n_moe: m,
            capacity: cache.capacity(),
            // the simulated link's reads take none of the decoding's time
            issue_us: 0.0,
            wrong_reads_delay: false,
        })
    });
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
        xfer,
        chunk_us,
        expert_bytes: cfg.expert_bytes,
        ready: vec![0.0; n_ids],
        unused_prefetch: vec![false; n_ids],
        link_free: 0.0,
        demand_free: 0.0,
        pending: VecDeque::new(),
        generation: vec![0; n_ids],
        now: 0.0,
        pinned: Vec::with_capacity(16),
        needed: Vec::with_capacity(16),
        layer: 0,
        token: 0,
        n_experts: e,
        n_moe: m,
        deadline_order: cfg.deadline_order,
        planner,
        r,
    };
    let (attention, compute) = (cfg.attention_us_per_layer, cfg.compute_us_per_layer);
    for seq in sequences {
        for t in seq.clone() {
            sim.r.tokens += 1;
            sim.token = t;
            sim.pinned.clear();
            sim.layer = 0;
            sim.offer(plan.at(t, 0), plan.probs_at(t, 0), sim.now + attention);
            for l in 0..m {
                let Some(ids) = view.layer(t, l) else {
                    continue;
                };
                sim.pinned.clear();
                sim.layer = l;
                sim.offer(plan.before_attention(t, l), None, sim.now + attention);
                sim.compute(attention);
                sim.lookup(l, e, ids);
                sim.layer = l + 1;
                let next = sim.now + compute + attention;
                sim.offer(plan.at(t, l + 1), plan.probs_at(t, l + 1), next);
                sim.compute(compute);
            }
        }
    }
    sim.r.planner = sim.planner.map(|p| p.counts);
    Ok(sim.r)
}
