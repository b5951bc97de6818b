//! Planned prefetch for a runtime that owns its cache and its reads (llama.cpp, a Python
//! engine; through the C ABI): the runtime says when each token starts and each MoE
//! layer routes, how long its reads take, and offers each forecast; the planner answers
//! which forecast experts to stage now.

use std::collections::HashSet;

use crate::{
    lookups_until, Candidate, PlanClock, PlanTimings, PlannerCounts, PlannerSettings, PlannerState,
    PrefetchPlanner, Verdict,
};

/// A forecast or a routing that does not fit the model's shape.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StagingError {
    #[error("a shape of {n_moe} MoE layers x {n_experts} experts, top-{top_k}: each must be at least 1, top-k at most the experts (and experts at most 65535)")]
    Shape {
        n_moe: usize,
        n_experts: usize,
        top_k: usize,
    },
    #[error("timings read_us {read_us}, layer_us {layer_us}: both must be above 0")]
    Timings { read_us: f64, layer_us: f64 },
    #[error("{what} {seconds} s is not a duration")]
    Duration { what: &'static str, seconds: f64 },
    #[error("MoE layer {layer} is outside 0..{n_moe}")]
    Layer { layer: usize, n_moe: usize },
    #[error("expert {expert} is outside 0..{n_experts}")]
    Expert { expert: u16, n_experts: usize },
    #[error("expert id {id} is outside 0..{ids} (layer * n_experts + expert)")]
    Id { id: u32, ids: usize },
    #[error("{what} holds {got} values for a forecast of {want} experts")]
    Length {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("{what} holds {got} values for a layer of {want} experts")]
    LayerWidth {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("a model of {n_moe} MoE layers x {n_experts} experts: each must be from 1 to 65535, and {max} experts in all", max = crate::NextUseForecast::MAX_EXPERTS)]
    ModelShape { n_moe: usize, n_experts: usize },
}

/// `layer` of a model of `n_moe` MoE layers, or the error naming it.
pub(crate) fn check_layer(layer: usize, n_moe: usize) -> Result<(), StagingError> {
    if layer < n_moe {
        Ok(())
    } else {
        Err(StagingError::Layer { layer, n_moe })
    }
}

/// Experts of a layer of `n_experts`, or the error naming the first out of range.
pub(crate) fn check_experts(experts: &[u16], n_experts: usize) -> Result<(), StagingError> {
    match experts.iter().find(|&&x| x as usize >= n_experts) {
        Some(&expert) => Err(StagingError::Expert { expert, n_experts }),
        None => Ok(()),
    }
}

fn duration(what: &'static str, seconds: f64) -> Result<f64, StagingError> {
    if seconds.is_finite() && seconds >= 0.0 {
        Ok(seconds)
    } else {
        Err(StagingError::Duration { what, seconds })
    }
}

/// What a runtime's link and cache hold when it offers a forecast.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkQueue {
    /// Reads queued or running now, demand and staged: a read staged now goes behind
    /// them.
    pub queued_reads: usize,
    /// Cache slots free now: a read into one evicts nothing.
    pub free_slots: usize,
}

/// The planner of a runtime that stages experts itself. Staged reads are assumed to go
/// one after another behind the reads already queued, each taking the link's measured
/// time per read, and a demand read to wait for a staged read on the link in full.
///
/// Where a layer's compute is shorter than a read, the link cannot hide even one read a
/// layer: it is bound, and reads only pay for the next lookup, judged by precision
/// ([`Self::break_even_precision`], plus the probability that the expert a read evicts
/// is needed); a forecast for a later lookup is held until its
/// layer's lookup is the next (a read for it now would take the link time that the
/// next lookup's own, surer forecast needs). Otherwise the link model judges. The
/// runtime should tell it what staged reads evict ([`Self::evicted`]) and let a staged
/// expert its layer routed without be the first to go (`planner/tests/runtime.rs`
/// measures such a runtime).
#[derive(Debug, Clone)]
pub struct StagingPlanner {
    planner: PrefetchPlanner,
    clock: PlanClock,
    /// The decode step and the MoE layer whose lookup comes next (`n_moe`: the next
    /// token's first).
    token: u64,
    next_layer: usize,
    started: bool,
    /// Experts staged for lookups still ahead (`layer * n_experts + expert`), and how
    /// many since the last lookup.
    staged: HashSet<u32>,
    staged_since_lookup: usize,
    /// Running mean of staged experts used per lookup: each is a read demand paging
    /// would have made at that lookup.
    staged_used_per_lookup: f64,
}

impl StagingPlanner {
    /// A planner for `n_moe` MoE layers of `n_experts` experts, `top_k` routed per
    /// token, and a cache of `capacity` experts; it measures its timings, or plans with
    /// `stated` ones.
    pub fn new(
        n_moe: usize,
        n_experts: usize,
        top_k: usize,
        capacity: usize,
        stated: Option<PlanTimings>,
    ) -> Result<Self, StagingError> {
        if n_moe == 0
            || n_experts == 0
            || n_experts > usize::from(u16::MAX)
            || top_k == 0
            || top_k > n_experts
        {
            return Err(StagingError::Shape {
                n_moe,
                n_experts,
                top_k,
            });
        }
        if let Some(t) = stated {
            let ok = |x: f64| x > 0.0 && x.is_finite();
            if !(ok(t.read_us) && ok(t.layer_us)) {
                return Err(StagingError::Timings {
                    read_us: t.read_us,
                    layer_us: t.layer_us,
                });
            }
        }
        let settings = PlannerSettings::untimed(top_k, n_experts, n_moe, capacity);
        Ok(StagingPlanner {
            planner: PrefetchPlanner::new(settings),
            clock: PlanClock::new(stated),
            token: 0,
            next_layer: 0,
            started: false,
            staged: HashSet::new(),
            staged_since_lookup: 0,
            staged_used_per_lookup: 0.0,
        })
    }

    fn dims(&self) -> (usize, usize) {
        let s = self.planner.settings();
        (s.n_moe, s.n_experts)
    }

    fn check_layer(&self, layer: usize) -> Result<(), StagingError> {
        check_layer(layer, self.dims().0)
    }

    fn check_experts(&self, experts: &[u16]) -> Result<(), StagingError> {
        check_experts(experts, self.dims().1)
    }

    /// A decode step starts (before its first MoE layer routes).
    pub fn token_started(&mut self) {
        if self.started {
            self.token += 1;
        }
        self.started = true;
        self.next_layer = 0;
        self.clock.token_started();
    }

    /// MoE layer `layer` of the current token routed to `experts`, of which
    /// `demand_reads` were read on demand: the planner learns how sure the forecasts
    /// of this layer were and how often a lookup misses.
    pub fn layer_routed(
        &mut self,
        layer: usize,
        experts: &[u16],
        demand_reads: usize,
    ) -> Result<(), StagingError> {
        self.check_layer(layer)?;
        self.check_experts(experts)?;
        let (_, e) = self.dims();
        let used: Vec<usize> = experts.iter().map(|&x| layer * e + x as usize).collect();
        self.clock.routed();
        self.planner.observe_layer(layer, &used, demand_reads);
        let staged_used = used
            .iter()
            .filter(|&&id| self.staged.contains(&(id as u32)))
            .count();
        self.staged_used_per_lookup +=
            crate::RATE * (staged_used as f64 - self.staged_used_per_lookup);
        self.next_layer = layer + 1;
        self.staged.retain(|&id| id as usize / e != layer);
        self.staged_since_lookup = 0;
        Ok(())
    }

    /// A staged read evicted `id` (`layer * n_experts + expert`): the planner watches
    /// whether it is needed again before the cache would have dropped it anyway, and
    /// so learns what a staged read's eviction costs (until told, it assumes the share
    /// of a layer's experts a token uses).
    pub fn evicted(&mut self, id: u32) -> Result<(), StagingError> {
        let (n_moe, n_experts) = self.dims();
        if id as usize >= n_moe * n_experts {
            return Err(StagingError::Id {
                id,
                ids: n_moe * n_experts,
            });
        }
        self.planner.note_evicted(id);
        self.staged.remove(&id); // a staged expert evicted before its use is not a staged one used
        Ok(())
    }

    /// A read (demand or staged) took `seconds` of the link.
    pub fn read_done(&mut self, seconds: f64) -> Result<(), StagingError> {
        self.clock
            .read_measured(duration("read time", seconds)? * 1e6, false);
        Ok(())
    }

    /// Issuing a staged read took `seconds` of the thread that decodes (the runtime's
    /// reads take its CPU): the planner charges every staged read that much.
    pub fn read_issued(&mut self, seconds: f64) -> Result<(), StagingError> {
        self.clock
            .issue_measured(duration("issue time", seconds)? * 1e6);
        Ok(())
    }

    /// A layer's demand reads held the decode thread `seconds` (waiting for them, or
    /// working meanwhile, as on a forecast): the layer's own compute excludes it.
    pub fn stalled(&mut self, seconds: f64) -> Result<(), StagingError> {
        self.clock.stalled(duration("stall", seconds)?);
        Ok(())
    }

    /// MoE layer `layer`'s forecast, best first, for its next lookup (this token's if
    /// it has not routed yet, else the next token's). `probs`: the forecaster's
    /// probability of each (`None`: it ranks only; the planner calibrates ranks).
    /// `resident[i]`: `ranking[i]` is resident or being read already (offered, so the
    /// planner learns how sure the forecast is, but not read again). Returns the experts
    /// to stage now, in order, as `layer * n_experts + expert`: from this forecast and
    /// from earlier ones not worth a read when offered, judged again; at most `room`.
    pub fn plan(
        &mut self,
        layer: usize,
        ranking: &[u16],
        probs: Option<&[f32]>,
        resident: Option<&[bool]>,
        queue: LinkQueue,
        room: usize,
    ) -> Result<Vec<u32>, StagingError> {
        self.check_layer(layer)?;
        self.check_experts(ranking)?;
        let want = ranking.len();
        for (what, got) in [
            ("probs", probs.map(<[f32]>::len)),
            ("resident", resident.map(<[bool]>::len)),
        ] {
            if let Some(got) = got.filter(|&g| g != want) {
                return Err(StagingError::Length { what, got, want });
            }
        }
        let (n, e) = self.dims();
        let (ahead, _) = lookups_until(layer, self.next_layer, n);
        let mut offered = Vec::with_capacity(want);
        for (rank, &x) in ranking.iter().enumerate() {
            let c = Candidate {
                id: (layer * e + x as usize) as u32,
                layers_ahead: ahead,
                horizon: ahead,
                prob: probs.map_or(f32::NAN, |p| p[rank]),
                rank,
            };
            self.planner.note_offered(&c);
            if !resident.is_some_and(|r| r[rank]) {
                offered.push((self.planner.calibrated(&c), c));
            }
        }
        self.planner
            .merge_deferred(&mut offered, self.token, self.next_layer);
        let s = self.clock.settings(*self.planner.settings(), 1.0);
        self.planner.set_settings(s);
        let bound = self.precision_at(&s);
        self.planner.set_break_even(bound);
        let now = self.clock.link(0.0);
        let limit = self.staging_limit();
        let mut issued = Vec::new();
        for (_, c) in offered {
            // The decode step whose lookup of its layer comes next.
            let (_, next_token) = lookups_until(c.id as usize / e, self.next_layer, n);
            let token = self.token + u64::from(next_token);
            if issued.len() == room || self.staged_since_lookup + issued.len() >= limit {
                self.planner.defer(c, token); // offered again at the next moment
                continue;
            }
            if self.staged.contains(&c.id) {
                continue;
            }
            if bound.is_some() && c.layers_ahead > 0 {
                self.planner.defer(c, token); // judged once its lookup is the next
                continue;
            }
            let reads_before = (queue.queued_reads + issued.len()) as f64;
            let link = crate::LinkState {
                link_free: now.now + reads_before * s.read_us,
                ..now
            };
            let victim = if issued.len() < queue.free_slots {
                0.0
            } else {
                self.planner.background_probability()
            };
            match self.planner.judge(&c, &link, victim) {
                Verdict::Issue => {
                    self.staged.insert(c.id);
                    issued.push(c.id);
                }
                Verdict::NotWorth => self.planner.defer(c, token),
                Verdict::Late => {}
            }
        }
        self.staged_since_lookup += issued.len();
        Ok(issued)
    }

    /// Where the link is bound (a layer's compute `C` shorter than a read `R`), the
    /// precision above which a read for the next lookup pays. Issued now, beside the
    /// compute before that lookup, a right one saves `C` of the stall there; a wrong
    /// one holds the link `R - C` past the lookup, ahead of its demand reads, and took
    /// `I` of the decoding thread to issue. So it pays where
    /// `p * C > (1 - p) * (R - C) + I`, above `(R - C + I) / R`. `None` where the link
    /// can hide a read a layer, or before it is timed.
    pub fn break_even_precision(&self) -> Option<f64> {
        self.precision_at(&self.clock.settings(*self.planner.settings(), 1.0))
    }

    /// [`Self::break_even_precision`] with the timings `s` now.
    fn precision_at(&self, s: &PlannerSettings) -> Option<f64> {
        let compute = self.clock.compute_us()?;
        (s.read_us > 0.0 && compute < s.read_us)
            .then(|| ((s.read_us - compute + s.issue_us) / s.read_us).min(1.0))
    }

    /// Reads staged per lookup at most: where demand paging alone lets a cache entry
    /// live a token's lookups (so an expert the next token reuses is still resident),
    /// staging may not shorten that below a token: the misses and the staged reads
    /// together insert no more than the cache holds per lookup. Demand paging alone
    /// would read the misses and the staged experts used (each replaced a demand read);
    /// judged by the misses alone, fewer the more staging pays, a cache smaller than a
    /// token's experts held a sure forecast to about half of them.
    fn staging_limit(&self) -> usize {
        let s = self.planner.settings();
        let per_lookup = s.capacity as f64 / s.n_moe as f64;
        let misses = self.planner.misses_per_lookup();
        if misses + self.staged_used_per_lookup < per_lookup {
            (per_lookup - misses).ceil() as usize
        } else {
            usize::MAX
        }
    }

    /// What it decided so far.
    pub fn counts(&self) -> PlannerCounts {
        self.planner.counts
    }

    /// The timings and statistics it plans with now.
    pub fn state(&self) -> PlannerState {
        let s = self.clock.settings(*self.planner.settings(), 1.0);
        PlannerState {
            read_us: s.read_us,
            chunk_us: s.chunk_us,
            layer_period_us: s.layer_period_us,
            break_even_precision: self.precision_at(&s),
            ..self.planner.state()
        }
    }
}
