//! Planned prefetch in the engine: the simulator's [`PrefetchPlanner`], fed with the
//! engine's measured timings (read time per expert, time between lookups), the loader's
//! queue and each layer's routing.

use std::collections::{HashMap, HashSet};

use crate::planner::{
    lookups_until, Candidate, LinkState, PlanClock, PlanTimings, PlannerSettings, PrefetchPlanner,
    Verdict,
};

use super::{LinkUse, OffloadEngine};

/// Reads per measurement of the link's time per read.
const LINK_WINDOW: f64 = 8.0;

/// The planner and the clock it plans with.
pub(super) struct EnginePlanner {
    pub(super) planner: PrefetchPlanner,
    pub(super) clock: PlanClock,
    /// The link's use at the last measurement.
    link_seen: LinkUse,
    /// The share of a read a demand read can wait for (one chunk of a prefetch).
    chunk_share: f64,
}

impl EnginePlanner {
    pub(super) fn new(
        top_k: usize,
        n_experts: usize,
        n_moe: usize,
        capacity: usize,
        chunk_share: f64,
        stated: Option<PlanTimings>,
    ) -> Self {
        EnginePlanner {
            // A wrong read holds a prefetch thread (and loader CPU beside the compute)
            // that the reads after it wait for; charging it measured faster here
            // (docs/results.md, "a wrong read's link time").
            planner: PrefetchPlanner::new(PlannerSettings {
                wrong_reads_delay: true,
                ..PlannerSettings::untimed(top_k, n_experts, n_moe, capacity)
            }),
            clock: PlanClock::new(stated),
            link_seen: LinkUse::default(),
            chunk_share,
        }
    }

    /// A read finished after `seconds`; the loader has used the link as `link` says.
    /// The planner's read time is the link's wall time per read over the last
    /// [`LINK_WINDOW`] reads or more (reads that overlap share it; a prefetch's pauses
    /// for demand reads are a demand read's time), not one read's latency; the first
    /// read's latency stands in until then.
    pub(super) fn read_done(&mut self, seconds: f64, link: LinkUse) {
        let done = |u: &LinkUse| u.reads + 0.5 * u.active as f64;
        let reads = done(&link) - done(&self.link_seen);
        if reads >= LINK_WINDOW {
            let busy = link.busy.saturating_sub(self.link_seen.busy).as_secs_f64();
            // The first measurement replaces the stand-in.
            let first = self.link_seen.reads == 0.0;
            self.clock.read_measured(busy * 1e6 / reads, first);
            self.link_seen = link;
        } else {
            self.clock.read_stand_in(seconds * 1e6);
        }
    }

    /// How much one more queued read moves the end of the loader's queue.
    fn queued_read_us(&self) -> f64 {
        self.clock.read_us().unwrap_or(0.0)
    }

    /// The clock and the next lookup, with the link free now (the caller adds the reads
    /// queued ahead); the planner's timings are brought up to date. `demand_reads`: the
    /// reads the layer just routed still waits for, in reads.
    fn link(&mut self, demand_reads: f64) -> LinkState {
        // One loader thread is kept for demand reads (with two or more), so a demand
        // read never queues behind a prefetch, and a prefetch pauses between chunks
        // while one runs: they share the disk for at most one chunk per prefetch
        // thread.
        let s = self
            .clock
            .settings(*self.planner.settings(), self.chunk_share);
        self.planner.set_settings(s);
        self.clock.link(demand_reads)
    }
}

impl OffloadEngine {
    /// Offers MoE layer `m`'s `ranking` (best first; `probs`: the forecaster's
    /// probabilities by expert, if it has them) to the planner; queues what pays.
    pub(super) fn offer_planned(&mut self, m: usize, ranking: &[u16], probs: Option<&[f32]>) {
        let Some(mut plan) = self.planner.take() else {
            return;
        };
        let (n, e) = (self.n_moe(), self.n_experts);
        let (ahead, _) = lookups_until(m, self.next_layer, n);
        let mut offered: Vec<(f64, Candidate)> = ranking
            .iter()
            .enumerate()
            .map(|(rank, &x)| {
                let c = Candidate {
                    id: (m * e + x as usize) as u32,
                    layers_ahead: ahead,
                    horizon: ahead,
                    prob: probs.map_or(f32::NAN, |p| p[x as usize]),
                    rank,
                };
                plan.planner.note_offered(&c);
                (plan.planner.calibrated(&c), c)
            })
            .collect();
        // Candidates not worth a read at an earlier moment are judged again now, while
        // their layer is ahead (as in the simulator).
        plan.planner
            .merge_deferred(&mut offered, self.step, self.next_layer);
        // Reads the layer just routed still waits for: its demand reads and the
        // prefetches of its experts in flight.
        let queued = self.loader.queued();
        let demand = match self.next_layer {
            0 => 0.0,
            l => {
                let routed = self.step * n as u64 + l as u64 - 1;
                reads_ahead(self.reads_in_flight(&queued), routed, false)
            }
        };
        let now = plan.link(demand);
        for (_, c) in offered {
            let id = c.id as usize;
            if self.cache.contains(id) {
                self.admit(id, false);
                continue;
            }
            let (victim, background) = match self.cache.victim(id, &self.pinned) {
                None => continue,
                Some(None) => (0.0, None),
                Some(Some(v)) => {
                    let (p, bg) = plan.planner.victim_probability(v as u32);
                    (p, bg.then_some(v as u32))
                }
            };
            // The decode step whose routing reads it (this one or the next).
            let target = self.deadline(id / e) / n as u64;
            let link = LinkState {
                link_free: now.now + self.reads_before(id, &queued) * plan.queued_read_us(),
                ..now
            };
            let verdict = plan.planner.judge(&c, &link, victim);
            if verdict == Verdict::NotWorth {
                plan.planner.defer(c, target);
            }
            if verdict == Verdict::Issue {
                self.admit(id, false);
                self.planned_for.insert(id, (target, plan.clock.moment()));
                if let Some(v) = background {
                    plan.planner.note_evicted(v);
                }
            }
        }
        // A newer forecast of layer `m`: what earlier moments queued for it and this
        // forecast ranks out goes.
        if !ranking.is_empty() {
            let target = self.deadline(m) / n as u64;
            let kept: Vec<usize> = ranking.iter().map(|&x| m * e + x as usize).collect();
            self.cancel_planned(&mut plan, m, target, &kept, false);
        }
        self.planner = Some(plan);
    }

    /// Cancels the queued reads planned at an earlier moment for decode step `token`'s
    /// MoE layer `m` that are not in `kept` (ids): the layer routed elsewhere, or a
    /// newer forecast of it ranks them out; with `stop_started` (the layer routed, as
    /// in the simulator) the one being read stops at its next chunk.
    fn cancel_planned(
        &mut self,
        plan: &mut EnginePlanner,
        m: usize,
        token: u64,
        kept: &[usize],
        stop_started: bool,
    ) {
        let losers = planned_losers(
            &self.planned_for,
            self.n_experts,
            m,
            token,
            plan.clock.moment(),
            kept,
        );
        for id in losers {
            let prefetch = self
                .in_flight
                .get(&id)
                .is_some_and(|r| !r.demand && !r.stopping);
            let gone = if prefetch && self.loader.cancel(id) {
                self.in_flight.remove(&id);
                self.report.prefetches -= 1;
                true
            } else if prefetch && stop_started && self.loader.stop(id) {
                if let Some(r) = self.in_flight.get_mut(&id) {
                    r.stopping = true;
                }
                true
            } else {
                false
            };
            if gone {
                self.cache.remove(id);
                self.unused_prefetch.remove(&id);
                plan.planner.counts.cancelled += 1;
            }
            if gone
                || !self.in_flight.contains_key(&id)
                || token == self.step && m < self.next_layer
            {
                self.planned_for.remove(&id);
            }
        }
    }

    /// Reads the loader runs before a prefetch of `id` queued now (reads being stopped
    /// aside), in reads: see [`reads_ahead`].
    fn reads_before(&self, id: usize, queued: &HashSet<usize>) -> f64 {
        let deadline = self.deadline(id / self.n_experts);
        reads_ahead(self.reads_in_flight(queued), deadline, true)
    }

    /// The reads in flight and not being stopped: demand, deadline, started (not in
    /// `queued`).
    fn reads_in_flight<'a>(
        &'a self,
        queued: &'a HashSet<usize>,
    ) -> impl Iterator<Item = (bool, u64, bool)> + 'a {
        self.in_flight
            .iter()
            .filter(|(_, r)| !r.stopping)
            .map(|(x, r)| (r.demand, r.deadline, !queued.contains(x)))
    }

    /// MoE layer `m` routed to `needed` with `misses` demand reads: the planner learns,
    /// and queued reads planned for this token's layer `m` that it did not need go.
    pub(super) fn planned_routing(&mut self, m: usize, needed: &[usize], misses: usize) {
        let Some(mut plan) = self.planner.take() else {
            return;
        };
        plan.clock.routed();
        plan.planner.observe_layer(m, needed, misses);
        let token = self.step;
        self.cancel_planned(&mut plan, m, token, needed, true);
        self.planned_for.retain(|_, &mut (tok, _)| tok >= token);
        self.report.planner = Some(plan.planner.counts);
        self.report.planner_state = Some(plan.planner.state());
        self.planner = Some(plan);
    }
}

/// The reads in `planned_for` (id -> decode step and moment it was planned for) that a
/// forecast or routing of decode step `token`'s MoE layer `m` at moment `moment` ranks
/// out: planned earlier for that layer and step, and not in `kept` (ids).
fn planned_losers(
    planned_for: &HashMap<usize, (u64, u64)>,
    n_experts: usize,
    m: usize,
    token: u64,
    moment: u64,
    kept: &[usize],
) -> Vec<usize> {
    let mut losers: Vec<usize> = planned_for
        .iter()
        .filter(|&(&id, &(tok, at))| {
            tok == token && at < moment && id / n_experts == m && !kept.contains(&id)
        })
        .map(|(&id, _)| id)
        .collect();
    losers.sort_unstable();
    losers
}

/// Reads in flight (demand, deadline, started) that go before a read due at
/// `deadline`, in reads: demand reads and reads due no later (earliest deadline first),
/// and with `later_started` the later prefetches already reading; a started read counts
/// half, the mean of what is left of it (counted whole, a layer's reads in flight made
/// the next layer's reads look late).
fn reads_ahead(
    reads: impl Iterator<Item = (bool, u64, bool)>,
    deadline: u64,
    later_started: bool,
) -> f64 {
    reads
        .map(|(demand, due, started)| {
            let before = demand || due <= deadline;
            match (before, started) {
                (true, false) => 1.0,
                (true, true) => 0.5,
                (false, true) if later_started => 0.5,
                _ => 0.0,
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ahead_count_started_reads_half_and_later_queued_ones_not() {
        // (demand, deadline, started)
        let reads = [
            (true, 0, false),  // queued demand read: 1
            (true, 9, true),   // started demand read: 0.5
            (false, 4, false), // queued, due earlier: 1
            (false, 5, true),  // started, due as early: 0.5
            (false, 6, false), // queued, due later: goes after it
            (false, 7, true),  // started, due later: reading already, 0.5
        ];
        assert_eq!(reads_ahead(reads.into_iter(), 5, true), 3.5);
        // A layer's own reads: the later prefetch reading is not the layer's.
        assert_eq!(reads_ahead(reads.into_iter(), 5, false), 3.0);
        assert_eq!(reads_ahead(std::iter::empty(), 5, true), 0.0);
    }

    /// A newer forecast of a layer ranks out only the reads planned earlier for that
    /// layer of that decode step; what it keeps, other layers, other steps and reads
    /// planned at this same moment stay.
    #[test]
    fn a_newer_forecast_ranks_out_only_earlier_plans_for_its_layer_and_step() {
        let e = 16;
        let planned: HashMap<usize, (u64, u64)> = [
            (2 * e + 1, (7, 3)),  // layer 2, step 7, moment 3: ranked out
            (2 * e + 4, (7, 3)),  // kept by the newer forecast
            (2 * e + 9, (7, 5)),  // planned at this moment
            (2 * e + 11, (8, 3)), // the next step's layer 2
            (3 * e + 1, (7, 3)),  // another layer
            (2 * e + 12, (7, 1)), // ranked out
        ]
        .into_iter()
        .collect();
        let kept = [2 * e + 4, 2 * e + 6];
        assert_eq!(
            planned_losers(&planned, e, 2, 7, 5, &kept),
            vec![2 * e + 1, 2 * e + 12]
        );
        // The layer's routing keeps what it used: here nothing planned earlier.
        assert_eq!(
            planned_losers(&planned, e, 3, 7, 5, &[3 * e + 1]),
            Vec::<usize>::new()
        );
    }
}
