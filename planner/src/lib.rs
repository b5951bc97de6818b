//! Bandwidth-aware prefetch planning: which forecast experts are worth a read now.
//!
//! Prefetching adds no bandwidth: a read that is wrong, late, or in the way of a demand
//! read makes decoding slower than fetching on demand. The planner admits a forecast
//! expert only when the read pays for itself, judged per candidate from
//!
//! - its **calibrated probability** `p` of being used at its layer: the forecaster's own
//!   probability (or, when it gives none, its rank) mapped through a reliability
//!   histogram the planner keeps online from every layer's routing once it is known;
//!   a probability's (or rank's) bin is also kept per forecast horizon (a forecast
//!   made further ahead is less sure), shrunk towards the bin of all horizons while it
//!   has seen little;
//! - its **deadline**: the estimated lookup time of its layer, `layers_ahead` layer
//!   periods (attention + expert compute) after the next lookup. The read is queued
//!   behind the link's work that goes before it and behind the demand reads expected at
//!   the lookups before its own (the running mean of misses per lookup). A read that
//!   lands after its lookup still saves the rest of the demand read issued then; one
//!   that would land no earlier than that is `Late` and not issued (the horizon adapts:
//!   a far layer has time, a near one may not);
//! - its **cost**: prefetch reads go in chunks and a demand read waits at most for the
//!   chunk on the link, so a read spanning `s` lookups delays demand reads by at most
//!   `s` chunks, each weighted by the running share of lookups that miss; and the expert
//!   the cache would evict for it is lost with the probability that it is needed: its
//!   own calibrated probability when it is a forecast candidate (a read is never swapped
//!   for a less likely one), else the share of experts evicted for prefetches that were
//!   needed again before the cache would have dropped them anyway (about one demand
//!   insertion later), learned as it goes.
//!
//! A runtime whose wrong reads delay the reads after it (the engine's prefetch threads)
//! also charges a candidate `(1 - p) * read` times the link's load (reads per lookup
//! times a read's time, over the time between lookups, at most 1): `wasted`.
//!
//! A candidate is issued when `p * saving > p_victim * read + delay + wasted`, best
//! first; every admitted read moves the link's end, so the budget per layer follows
//! from the bandwidth, the compute time and the forecast's confidence. A read for a
//! layer further ahead than a cache entry lives (capacity over the running insertions
//! per lookup) would be evicted before its use and is not issued. A candidate not worth
//! a read now is offered again at the next moment while its layer is still ahead: a
//! read that would sit in the way of this layer's demand reads may pay once they are
//! done. The simulator and the engine share this type; each tells it the link's state
//! and each layer's routing. Runtimes outside them (through the C ABI and Python) use
//! it through [`StagingPlanner`], which keeps the link's state and the clock itself.
//!
//! A runtime whose link cannot hide one read in a layer's compute (link-bound, as a
//! page cache read from an SSD on a small machine is) plans otherwise: see
//! [`StagingPlanner`]; the planner then issues a candidate when `p` exceeds a
//! break-even precision plus `p_victim` ([`PrefetchPlanner::set_break_even`]).
//!
//! What the model of the link leaves out (a read's CPU time, taken from the compute on a
//! small machine; the predictor's own calls) is measured by [`PrefetchGuard`]: decode
//! steps in windows with prefetch on or off, the faster setting kept.
//!
//! Which resident expert to drop is the cache's: [`NextUseForecast`] estimates when each
//! expert is used next from its layer's reuse gaps and the expert's own frequency, for
//! the next-use eviction of the simulator, the engine and runtimes (C ABI, Python).

use std::collections::HashMap;

mod budget;
mod clock;
mod guard;
mod next_use;
mod staging;
pub use budget::PrefetchBudget;
pub use clock::{PlanClock, PlanTimings};
pub use guard::PrefetchGuard;
pub use next_use::NextUseForecast;
pub use staging::{LinkQueue, StagingError, StagingPlanner};

/// Lookups between the next one (layer `next_layer` of the current token) and MoE layer
/// `layer`'s, and whether that lookup is the next token's (`layer` was passed).
pub fn lookups_until(layer: usize, next_layer: usize, n_moe: usize) -> (usize, bool) {
    if layer >= next_layer {
        (layer - next_layer, false)
    } else {
        (layer + n_moe - next_layer, true)
    }
}

/// Timings the planner plans against (microseconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannerSettings {
    /// Time to read one expert over the link.
    pub read_us: f64,
    /// Time of one prefetch chunk (a demand read waits at most this long).
    pub chunk_us: f64,
    /// One layer's attention + expert compute: the time between two lookups.
    pub layer_period_us: f64,
    /// Routed experts per token and layer, and experts per layer.
    pub top_k: usize,
    pub n_experts: usize,
    pub n_moe: usize,
    /// Experts the cache holds (a read for a layer further ahead than an entry lives is
    /// evicted before its use).
    pub capacity: usize,
    /// Time the decoding thread spends issuing one staged read (a runtime whose reads
    /// take its own CPU, as the page cache's do on a small machine; 0 where loader
    /// threads issue them): every staged read costs it, used or not.
    pub issue_us: f64,
    /// Whether a wrong read's link time delays the reads after it (the engine: its
    /// prefetch threads read one after another, each read also takes loader CPU beside
    /// the compute), charged `(1 - p) * read` times [`PrefetchPlanner::link_load`]; off,
    /// a wrong read costs only the demand reads it delays (the simulator's link gives
    /// prefetches the time its demand reads leave).
    pub wrong_reads_delay: bool,
}

impl PlannerSettings {
    /// A model's shape and a cache's size, with no timings yet (a runtime measures or
    /// states them as it goes).
    pub fn untimed(top_k: usize, n_experts: usize, n_moe: usize, capacity: usize) -> Self {
        PlannerSettings {
            read_us: 0.0,
            chunk_us: 0.0,
            layer_period_us: 0.0,
            top_k,
            n_experts,
            n_moe,
            capacity,
            issue_us: 0.0,
            wrong_reads_delay: false,
        }
    }
}

/// One forecast expert offered to the planner.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// `layer * n_experts + expert`.
    pub id: u32,
    /// Lookups between the next one and the one that uses it (0: the next lookup).
    pub layers_ahead: usize,
    /// `layers_ahead` when the forecast was made: the planner calibrates the
    /// probabilities (or ranks) of each horizon (up to [`HORIZONS`]) apart as well, as a
    /// forecast further ahead is less sure.
    pub horizon: usize,
    /// The forecaster's probability (NaN when it ranks only).
    pub prob: f32,
    /// Position in its layer's list, best first.
    pub rank: usize,
}

/// The link and clock as the caller sees them when it offers candidates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkState {
    pub now: f64,
    /// When the reads already queued (demand and prefetch) finish.
    pub link_free: f64,
    /// Estimated time of the next lookup (a layer's routing).
    pub next_lookup: f64,
}

/// Why a candidate was or was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Issue,
    /// It would land no earlier than a demand read issued at its layer's lookup.
    Late,
    /// Its expected saving is below its cost.
    NotWorth,
}

/// What the planner decided, summed over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlannerCounts {
    pub offered: u64,
    pub issued: u64,
    pub late: u64,
    pub not_worth: u64,
    /// Queued reads cancelled: their layer routed elsewhere, or (in the engine) a newer
    /// forecast of it ranked them out.
    pub cancelled: u64,
}

/// What the planner plans with at a moment: the timings it was given or measured, and
/// the link and cache statistics it learned (a runtime's summary of `--budget auto`).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlannerState {
    /// Link time per expert read, and per prefetch chunk (microseconds).
    pub read_us: f64,
    pub chunk_us: f64,
    /// Time between two lookups (microseconds).
    pub layer_period_us: f64,
    /// Running mean of demand reads per lookup, and share of lookups with one.
    pub misses_per_lookup: f64,
    pub miss_share: f64,
    /// Lookups a cache entry lives (capacity over insertions per lookup): reads for
    /// layers further ahead are not issued.
    pub entry_lifetime_lookups: f64,
    /// The learned probability that an expert evicted for a prefetch is needed again
    /// before the cache would have dropped it anyway.
    pub background_probability: f64,
    /// The calibrated probability of the forecasts offered so far against what the
    /// forecasters said, over all offers with a probability (both in [0, 1]; `None`
    /// without such offers).
    pub offered_probability: Option<f64>,
    pub calibrated_probability: Option<f64>,
    /// The precision above which a read is issued, where a runtime's link is bound
    /// ([`StagingPlanner`]; `None`: the link model judges).
    #[serde(default)]
    pub break_even_precision: Option<f64>,
    /// The link's load a wrong read's time is charged at ([`PrefetchPlanner::link_load`];
    /// `None` where the runtime charges none).
    #[serde(default)]
    pub wrong_read_load: Option<f64>,
}

const PROB_BINS: usize = 20;
const RANK_BINS: usize = 32;
/// Probability bins, then rank bins.
const BINS: usize = PROB_BINS + RANK_BINS;
/// Forecast horizons calibrated apart (further ones share the last).
pub const HORIZONS: usize = 8;
/// Pseudo-observations of the all-horizon estimate behind each horizon's bin.
const HORIZON_PRIOR_WEIGHT: f64 = 16.0;
/// Pseudo-observations behind each bin's prior (the forecaster's own probability, or
/// 1/2 for a rank).
const PRIOR_WEIGHT: f64 = 4.0;
/// Weight of the newest lookup in the running miss statistics.
const RATE: f64 = 0.02;

/// The probability at the centre of probability bin `b`: the forecaster's own, the
/// bin's prior.
fn bin_centre(b: usize) -> f64 {
    (b as f64 + 0.5) / PROB_BINS as f64
}

/// The planner: settings, its reliability histogram and link statistics.
#[derive(Debug, Clone)]
pub struct PrefetchPlanner {
    settings: PlannerSettings,
    /// Per bin: (used, offered) counts, probability bins then rank bins; and the same
    /// bins of each horizon (observed counts only).
    bins: Vec<(f64, f64)>,
    horizon_bins: Vec<(f64, f64)>,
    /// Candidates offered since their layer last routed: id -> bin, horizon bin.
    pending: HashMap<u32, (usize, usize)>,
    /// Running mean of demand reads per lookup, and share of lookups with one.
    misses_per_lookup: f64,
    miss_share: f64,
    /// Experts evicted for prefetches while in no forecast, with the lookup count then;
    /// and (needed again within a token's lookups, evicted) counts.
    evicted: HashMap<u32, u64>,
    regret: (f64, f64),
    lookups: u64,
    /// MoE layers per token (the longest an evicted expert is watched).
    n_moe: usize,
    /// Candidates not worth a read when offered, with the token they are for: judged
    /// again at the next moment while their layer is still ahead.
    deferred: Vec<(Candidate, u64)>,
    /// Running mean of cache insertions (demand and prefetch reads) per lookup, and the
    /// prefetches issued since the last lookup.
    insertions_per_lookup: f64,
    issued_since: u64,
    /// Issue a candidate when its calibrated probability exceeds this (a link-bound
    /// runtime's), instead of weighing its saving against its costs.
    break_even: Option<f64>,
    pub counts: PlannerCounts,
}

impl PrefetchPlanner {
    /// A planner with prior beliefs: the forecaster is calibrated, a quarter of lookups
    /// miss once.
    pub fn new(settings: PlannerSettings) -> Self {
        let mut bins = Vec::with_capacity(BINS);
        for b in 0..PROB_BINS {
            bins.push((bin_centre(b) * PRIOR_WEIGHT, PRIOR_WEIGHT));
        }
        for _ in 0..RANK_BINS {
            bins.push((0.5 * PRIOR_WEIGHT, PRIOR_WEIGHT));
        }
        PrefetchPlanner {
            settings,
            bins,
            horizon_bins: vec![(0.0, 0.0); HORIZONS * BINS],
            pending: HashMap::new(),
            misses_per_lookup: 0.25,
            miss_share: 0.25,
            evicted: HashMap::new(),
            regret: (
                PRIOR_WEIGHT * settings.top_k as f64 / settings.n_experts.max(1) as f64,
                PRIOR_WEIGHT,
            ),
            lookups: 0,
            n_moe: settings.n_moe.max(1),
            deferred: Vec::new(),
            insertions_per_lookup: 1.0,
            issued_since: 0,
            break_even: None,
            counts: PlannerCounts::default(),
        }
    }

    pub fn settings(&self) -> &PlannerSettings {
        &self.settings
    }

    /// The timings and statistics it plans with now.
    pub fn state(&self) -> PlannerState {
        let s = &self.settings;
        // Probability bins: what the forecasters said (the bins' centres, weighed by
        // the observed offers) against what was used.
        let (mut said, mut used, mut n) = (0.0, 0.0, 0.0);
        for (b, &(u, o)) in self.bins[..PROB_BINS].iter().enumerate() {
            let observed = o - PRIOR_WEIGHT;
            said += bin_centre(b) * observed;
            used += u - bin_centre(b) * PRIOR_WEIGHT;
            n += observed;
        }
        let mean = |x: f64| (n > 0.0).then(|| x / n);
        PlannerState {
            read_us: s.read_us,
            chunk_us: s.chunk_us,
            layer_period_us: s.layer_period_us,
            misses_per_lookup: self.misses_per_lookup,
            miss_share: self.miss_share,
            entry_lifetime_lookups: s.capacity as f64 / self.insertions_per_lookup.max(1e-3),
            background_probability: self.background_probability(),
            offered_probability: mean(said),
            calibrated_probability: mean(used),
            break_even_precision: self.break_even,
            wrong_read_load: self.wrong_read_load(),
        }
    }

    /// New timings (a runtime that measures them as it goes).
    pub fn set_settings(&mut self, settings: PlannerSettings) {
        self.settings = settings;
    }

    /// Judge timed candidates by precision: issue one (not late, not outliving its
    /// cache entry) when its calibrated probability exceeds `precision` plus its
    /// victim's (`None`: weigh its saving against its costs).
    pub fn set_break_even(&mut self, precision: Option<f64>) {
        self.break_even = precision;
    }

    /// `c`'s bin (its probability's, or its rank's when it has none), and that bin at
    /// its horizon.
    fn bin(c: &Candidate) -> (usize, usize) {
        let b = if c.prob.is_finite() {
            ((c.prob.clamp(0.0, 1.0) as f64 * PROB_BINS as f64) as usize).min(PROB_BINS - 1)
        } else {
            PROB_BINS + c.rank.min(RANK_BINS - 1)
        };
        (b, c.horizon.min(HORIZONS - 1) * BINS + b)
    }

    /// The estimate of bins `(b, h)`: the horizon's counts over the all-horizon
    /// estimate's [`HORIZON_PRIOR_WEIGHT`] pseudo-observations.
    fn estimate(&self, (b, h): (usize, usize)) -> f64 {
        let (used, offered) = self.bins[b];
        let (u, o) = self.horizon_bins[h];
        (u + HORIZON_PRIOR_WEIGHT * used / offered) / (o + HORIZON_PRIOR_WEIGHT)
    }

    /// The calibrated probability that `c` is used at its layer.
    pub fn calibrated(&self, c: &Candidate) -> f64 {
        self.estimate(Self::bin(c))
    }

    /// The calibrated probability of an expert offered since its layer last routed
    /// (`None` when it was not).
    pub fn offered_probability(&self, id: u32) -> Option<f64> {
        self.pending.get(&id).map(|&b| self.estimate(b))
    }

    /// Lookups an expert the cache evicts now would have stayed anyway: about one
    /// demand insertion, at the running miss rate (at least 1, at most a token).
    pub fn survival_lookups(&self) -> usize {
        (1.0 / self.misses_per_lookup.max(1e-3))
            .ceil()
            .clamp(1.0, self.n_moe as f64) as usize
    }

    /// The probability that evicting resident `id` costs a read: its forecast when it
    /// is offered (a read is never swapped for a less likely one), else the learned
    /// background; and whether it is the background (then [`Self::note_evicted`] when
    /// it goes).
    pub fn victim_probability(&self, id: u32) -> (f64, bool) {
        match self.offered_probability(id) {
            Some(p) => (p, false),
            _ => (self.background_probability(), true),
        }
    }

    /// Running mean of demand reads per lookup.
    pub fn misses_per_lookup(&self) -> f64 {
        self.misses_per_lookup
    }

    /// The probability that a resident expert in no current forecast is needed before
    /// the cache would have dropped it anyway: learned from the experts evicted for
    /// prefetches (the share needed again before the cache's next insertion, in
    /// lookups at the running insertion rate), starting from the share of a layer's
    /// experts each token uses.
    pub fn background_probability(&self) -> f64 {
        self.regret.0 / self.regret.1
    }

    /// Expert `id`, in no forecast, was evicted for a prefetch: watch whether it is
    /// needed again soon.
    pub fn note_evicted(&mut self, id: u32) {
        self.evicted.insert(id, self.lookups);
    }

    /// Records that `c` was offered (its layer's routing will update the histogram).
    pub fn note_offered(&mut self, c: &Candidate) {
        self.counts.offered += 1;
        self.pending.insert(c.id, Self::bin(c));
    }

    /// Keeps `c` (for decode step `token`), judged not worth a read now (or not judged
    /// yet), to be offered again at the next moment.
    pub fn defer(&mut self, c: Candidate, token: u64) {
        if !self.deferred.iter().any(|(d, _)| d.id == c.id) {
            self.deferred.push((c, token));
        }
    }

    /// The deferred candidates whose layer is still ahead of decode step `token`'s
    /// layer `next_layer`, with their distance updated; the rest are dropped.
    fn take_deferred(&mut self, token: u64, next_layer: usize) -> Vec<Candidate> {
        let (e, m) = (self.settings.n_experts.max(1), self.n_moe as i64);
        self.deferred
            .drain(..)
            .filter_map(|(mut c, t)| {
                let layer = (c.id as usize / e) as i64;
                let ahead = (t as i64 - token as i64) * m + layer - next_layer as i64;
                (ahead >= 0).then(|| {
                    c.layers_ahead = ahead as usize;
                    c
                })
            })
            .collect()
    }

    /// Adds to `offered` (calibrated probability, candidate) the deferred candidates still
    /// ahead of decode step `token`'s layer `next_layer` that it does not hold, judged
    /// again at this moment, and orders them all best first: higher probability, then
    /// the nearer layer.
    pub fn merge_deferred(
        &mut self,
        offered: &mut Vec<(f64, Candidate)>,
        token: u64,
        next_layer: usize,
    ) {
        for c in self.take_deferred(token, next_layer) {
            if !offered.iter().any(|(_, o)| o.id == c.id) {
                offered.push((self.calibrated(&c), c));
            }
        }
        offered.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.layers_ahead.cmp(&b.1.layers_ahead))
        });
    }

    /// When a read of `c` issued now would land, with the demand reads expected at the
    /// lookups before its own going first; and how many lookups it spans.
    fn landing(&self, c: &Candidate, link: &LinkState, deadline: f64) -> (f64, usize) {
        let s = &self.settings;
        let start = link.now.max(link.link_free);
        let mut end = start + s.read_us;
        let mut spans = 0;
        let mut lookup = link.next_lookup;
        while lookup < end && spans <= c.layers_ahead + 1 {
            if lookup >= start && lookup < deadline {
                end += self.misses_per_lookup * s.read_us;
            }
            spans += 1;
            lookup += s.layer_period_us.max(1e-9);
        }
        (end, spans)
    }

    /// Whether reading `c` now pays: `victim` is the probability that the expert the
    /// cache would evict for it is needed (0 when a slot is free).
    pub fn judge(&mut self, c: &Candidate, link: &LinkState, victim: f64) -> Verdict {
        let s = self.settings;
        let deadline = link.next_lookup + c.layers_ahead as f64 * s.layer_period_us;
        let (landing, spans) = self.landing(c, link, deadline);
        // A read that lands `late` after its lookup still saves the rest of a demand
        // read issued then; one that lands no earlier than that saves nothing.
        let saving = (deadline + s.read_us - landing).min(s.read_us);
        let late = if s.read_us > 0.0 {
            saving <= 0.0
        } else {
            landing > deadline
        };
        // An entry lives about capacity / insertions-per-lookup lookups.
        let lifetime = s.capacity as f64 / self.insertions_per_lookup.max(1e-3);
        let verdict = if late {
            Verdict::Late
        } else if c.layers_ahead as f64 + 1.0 > lifetime {
            Verdict::NotWorth
        } else {
            let p = self.calibrated(c);
            let issue = match self.break_even {
                // Link-bound: a break-even precision, not the link model.
                Some(precision) if s.read_us > 0.0 => p > precision + victim,
                _ if s.read_us > 0.0 => {
                    let delay = spans as f64 * self.miss_share * s.chunk_us.min(s.read_us);
                    let wasted = self
                        .wrong_read_load()
                        .map_or(0.0, |load| (1.0 - p) * load * s.read_us);
                    p * saving > victim * s.read_us + delay + wasted + s.issue_us
                }
                // Untimed (reads take no time), only the probabilities count.
                _ => p > victim,
            };
            if issue {
                Verdict::Issue
            } else {
                Verdict::NotWorth
            }
        };
        match verdict {
            Verdict::Issue => {
                self.counts.issued += 1;
                self.issued_since += 1;
            }
            Verdict::Late => self.counts.late += 1,
            Verdict::NotWorth => self.counts.not_worth += 1,
        }
        verdict
    }

    /// The share of the link's time its reads take: reads per lookup (demand and
    /// prefetch) times a read's link time, over the time between lookups (at most 1).
    pub fn link_load(&self) -> f64 {
        let s = &self.settings;
        if s.layer_period_us <= 0.0 {
            return 0.0;
        }
        (self.insertions_per_lookup * s.read_us / s.layer_period_us).clamp(0.0, 1.0)
    }

    /// The link load a wrong read's time is charged at, where the runtime charges it
    /// ([`PlannerSettings::wrong_reads_delay`]).
    fn wrong_read_load(&self) -> Option<f64> {
        self.settings.wrong_reads_delay.then(|| self.link_load())
    }

    /// Layer `layer` routed to `used` (ids) with `demand_reads` misses: the histogram
    /// learns from every candidate offered for it, the link statistics from the misses.
    pub fn observe_layer(&mut self, layer: usize, used: &[usize], demand_reads: usize) {
        let e = self.settings.n_experts;
        let (bins, horizon_bins) = (&mut self.bins, &mut self.horizon_bins);
        self.pending.retain(|&id, &mut (b, h)| {
            if id as usize / e != layer {
                return true;
            }
            let hit = f64::from(u8::from(used.contains(&(id as usize))));
            bins[b].0 += hit;
            bins[b].1 += 1.0;
            horizon_bins[h].0 += hit;
            horizon_bins[h].1 += 1.0;
            false
        });
        self.lookups += 1;
        let inserted = demand_reads as f64 + self.issued_since as f64;
        self.issued_since = 0;
        self.insertions_per_lookup += RATE * (inserted - self.insertions_per_lookup);
        // An expert evicted for a prefetch would have gone anyway at about the next
        // demand insertion: it is regretted if needed before then.
        let window = self.survival_lookups() as u64;
        let lookups = self.lookups;
        let regret = &mut self.regret;
        self.evicted.retain(|&id, &mut at| {
            let needed = used.contains(&(id as usize));
            let expired = lookups - at > window;
            if needed || expired {
                regret.0 += f64::from(u8::from(needed));
                regret.1 += 1.0;
            }
            !(needed || expired)
        });
        self.misses_per_lookup += RATE * (demand_reads as f64 - self.misses_per_lookup);
        self.miss_share += RATE * (f64::from(u8::from(demand_reads > 0)) - self.miss_share);
    }
}
