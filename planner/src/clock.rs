//! The timings a runtime plans with: measured as it decodes (a read's link time, the
//! time between lookups) or stated.

use std::time::Instant;

use crate::{LinkState, PlannerSettings};

/// Weight of the newest measurement in the running timings.
const RATE: f64 = 0.1;

/// Timings the planner plans with in place of the ones it measures: its clock moves
/// `layer_us` per moment (a token's start, a layer's routing) and each read takes
/// `read_us`, as in the simulator, so its decisions do not depend on how busy the
/// machine is (tests; a run reproducing a simulator's setting).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanTimings {
    /// Link time per expert read, microseconds.
    pub read_us: f64,
    /// Time from one lookup to the next (and from a token's start to its first),
    /// microseconds.
    pub layer_us: f64,
}

fn ema(old: Option<f64>, x: f64) -> Option<f64> {
    Some(old.map_or(x, |o| o + RATE * (x - o)))
}

/// A runtime's clock and running timings: told when each token starts, each layer
/// routes, the decode thread stalls and a read's link time is known, it gives the
/// planner the link's state at each moment.
#[derive(Debug, Clone)]
pub struct PlanClock {
    clock: Instant,
    /// Stated timings instead of measured ones.
    stated: Option<PlanTimings>,
    /// Running means, microseconds: the link's time per expert read, one layer (lookup
    /// to lookup), a layer without its stalls, and a token's start to its first lookup.
    read_us: Option<f64>,
    period_us: Option<f64>,
    compute_us: Option<f64>,
    first_lookup_us: Option<f64>,
    /// Running mean of the time the decoding thread takes to issue a staged read,
    /// microseconds (told by the runtime, stated timings or not; none told: 0).
    issue_us: Option<f64>,
    /// The stall since the last lookup.
    stall_us: f64,
    token_start: f64,
    last_lookup: Option<f64>,
    /// The moments (token starts and layer routings) so far.
    moment: u64,
}

impl PlanClock {
    /// A clock that measures its timings, or plans with `stated` ones.
    pub fn new(stated: Option<PlanTimings>) -> Self {
        let layer_us = stated.map(|t| t.layer_us);
        PlanClock {
            clock: Instant::now(),
            stated,
            read_us: stated.map(|t| t.read_us),
            period_us: layer_us,
            compute_us: layer_us,
            first_lookup_us: layer_us,
            issue_us: None,
            stall_us: 0.0,
            token_start: 0.0,
            last_lookup: None,
            moment: 0,
        }
    }

    /// Microseconds since the clock started; with stated timings, the latest moment's
    /// time.
    pub fn now(&self) -> f64 {
        match self.stated {
            Some(t) => self.moment as f64 * t.layer_us,
            None => self.clock.elapsed().as_secs_f64() * 1e6,
        }
    }

    /// The moments (token starts and layer routings) so far.
    pub fn moment(&self) -> u64 {
        self.moment
    }

    /// The link's time per read (`None` before the first read is measured).
    pub fn read_us(&self) -> Option<f64> {
        self.read_us
    }

    /// A layer's time without its stalls, lookup to lookup (the stated layer time; else
    /// `None` before two lookups of a token).
    pub fn compute_us(&self) -> Option<f64> {
        self.compute_us
    }

    /// A decode step starts.
    pub fn token_started(&mut self) {
        self.moment += 1;
        self.token_start = self.now();
        self.last_lookup = None;
        self.stall_us = 0.0;
    }

    /// A MoE layer routed now.
    pub fn routed(&mut self) {
        self.moment += 1;
        let now = self.now();
        match self.last_lookup {
            _ if self.stated.is_some() => {}
            Some(t) => {
                self.period_us = ema(self.period_us, now - t);
                self.compute_us = ema(self.compute_us, (now - t - self.stall_us).max(0.0));
            }
            None => self.first_lookup_us = ema(self.first_lookup_us, now - self.token_start),
        }
        self.last_lookup = Some(now);
        self.stall_us = 0.0;
    }

    /// A layer's demand reads held the decode thread `seconds` (waiting for them, or
    /// working meanwhile, as on a forecast): the layer's own compute excludes it.
    pub fn stalled(&mut self, seconds: f64) {
        self.stall_us += seconds * 1e6;
    }

    /// A measurement of the link's time per read, microseconds: it replaces the
    /// running mean with `replace` (the first measurement over a window replaces a
    /// stand-in), else moves it.
    pub fn read_measured(&mut self, us: f64, replace: bool) {
        if self.stated.is_none() {
            self.read_us = if replace {
                Some(us)
            } else {
                ema(self.read_us, us)
            };
        }
    }

    /// Issuing a staged read took the decoding thread `us` microseconds.
    pub fn issue_measured(&mut self, us: f64) {
        self.issue_us = ema(self.issue_us, us);
    }

    /// One read's latency, microseconds, standing in for the link's time per read until
    /// that is measured.
    pub fn read_stand_in(&mut self, us: f64) {
        if self.read_us.is_none() {
            self.read_us = Some(us);
        }
    }

    /// `base` with the timings now (a prefetch chunk is `chunk_share` of a read).
    pub fn settings(&self, base: PlannerSettings, chunk_share: f64) -> PlannerSettings {
        let read = self.read_us.unwrap_or(0.0);
        PlannerSettings {
            read_us: read,
            chunk_us: read * chunk_share.clamp(0.0, 1.0),
            layer_period_us: self.period_us.unwrap_or(0.0),
            issue_us: self.issue_us.unwrap_or(0.0),
            ..base
        }
    }

    /// The clock and the next lookup, with the link free now (the caller adds the reads
    /// queued ahead). `demand_reads`: the reads the layer just routed still waits for.
    pub fn link(&self, demand_reads: f64) -> LinkState {
        let now = self.now();
        let read = self.read_us.unwrap_or(0.0);
        let period = self.period_us.unwrap_or(0.0);
        // The next lookup comes a period after the last on average; when this layer's
        // demand reads are still running it comes no earlier than their end and a
        // layer's compute after it (a layer with misses takes longer than the mean).
        let next_lookup = match self.last_lookup {
            Some(t) => {
                let known = now + demand_reads * read + self.compute_us.unwrap_or(0.0);
                (t + period).max(known)
            }
            None => self.token_start + self.first_lookup_us.unwrap_or(0.0),
        }
        .max(now);
        LinkState {
            now,
            link_free: now,
            next_lookup,
        }
    }
}
