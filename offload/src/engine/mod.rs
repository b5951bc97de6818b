//! The offloading engine: every non-expert weight stays in memory; routed experts live
//! on disk and are read on demand into a bounded set of resident experts (the
//! [`ExpertCache`] decides which go), with prefetching on background threads while the
//! current layer computes, and optional cache-aware routing.
//!
//! It is a [`RoutingObserver`](inference::routing::RoutingObserver) of a model whose experts were offloaded
//! ([`OffloadEngine::new`] drops them): the model calls it at each forward, at each MoE
//! layer's routing, and for each expert it needs, so [`inference::generate::generate`] runs
//! unchanged. Per decode step:
//!
//! 1. at the token's start, a learned predictor (if any) forecasts every layer's experts
//!    of this token from its id and history; the `budget` best per layer are queued;
//!    with a token table, every layer's `budget` most frequent experts for the token's id
//!    are queued too;
//! 2. with `pre_attention`, at layer `l`'s start the layer's gate is applied to the
//!    layer's input (before attention; the pre-attention gate) and its `budget` best
//!    experts are queued, to arrive while attention runs;
//! 3. at layer `l`, the router's experts are looked up: resident (**hit**), still being
//!    read (**late**: the layer waits) or absent (**miss**: read on demand, ahead of the
//!    queued prefetches); with `layer_forecasts`, a lookahead predictor then forecasts
//!    layers `l+1..l+D` from the layers routed so far;
//!    with an online blend ([`crate::prefetch::OnlineBlend`]), it forecasts the `D`
//!    layers after `l` (past the last MoE layer, the next token's first ones) from the
//!    counts, the last tokens and the request's use;
//! 4. once the last MoE layer has routed (before its experts run), with `lens` the logit
//!    lens forecasts the next token's layer 0 from that layer's router input, and the
//!    predictor observes the token's routing; one trained with token-id dropout then
//!    forecasts the next token's layer 0 before its id is sampled; the `budget` best of
//!    each are queued.
//!
//! Cache-aware routing adds `margin` to the selection score of every expert that is
//! resident or arriving, so a cached expert replaces an uncached choice whose score is
//! within `margin` of it; weights come from the unbiased scores.
//!
//! Hit rates and stall times count decode steps only; the prompt is run as one batch.

mod chunked;
pub mod compare;
mod forecast;
pub mod loader;
mod observer;
pub mod paired;
mod planned;
pub mod quality;
pub mod replay;
mod report;
mod source;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Device;
use predictor::{OnlinePredictor, Task};

use crate::cache::{CacheScope, EvictionPolicy, ExpertCache, Insertion};
use crate::gate::NextTokenGate;
pub use crate::planner::PlanTimings;
use crate::prefetch::OnlineBlend;
use inference::checkpoint::Checkpoint;
use inference::error::{ModelError, Result};
use inference::layers::SwiGlu;
use inference::models::MoeModel;
use inference::routing::RouteDecision;
pub use loader::{ExpertLoader, LinkUse, Loaded};
pub use paired::{AlternatingPrefetch, PairedEstimate, PrefetchSwitch};
pub use planner::PrefetchGuard;
pub use report::EngineReport;
pub use store::{ExpertStore, DEFAULT_READ_STREAMS, READ_CHUNK};

/// Loader threads by default: planned, one is kept for demand reads and two read
/// prefetches side by side (an SSD serves two reads faster than one: on the bench's
/// disk the oracle prefetcher went from 1.0x to 1.4x demand paging with the second).
pub const DEFAULT_LOADER_THREADS: usize = 3;
/// Decode steps per window of the prefetch guard, and how often it measures the setting
/// it does not use (every this many windows).
const GUARD_WINDOW: usize = 8;
const GUARD_EXPLORE_EVERY: usize = 6;

/// How the engine runs.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Resident experts, all MoE layers together.
    pub capacity: usize,
    /// LRU, LFU or next-use (Belady needs the future: simulator only).
    pub policy: EvictionPolicy,
    /// Experts prefetched per forecast layer; with `planned`, candidates per forecast
    /// layer offered to the planner.
    pub budget: usize,
    /// Plan prefetches against the measured link ([`crate::planner::PrefetchPlanner`]):
    /// a candidate is read only when it pays, and queued reads for a layer that routed
    /// elsewhere are cancelled.
    pub planned: bool,
    /// Planned: run windows of decode steps with and without prefetch and keep the
    /// faster ([`PrefetchGuard`]).
    pub prefetch_guard: bool,
    /// Measure prefetch inside the run: run it on and off in alternate windows of this
    /// many decode steps ([`AlternatingPrefetch`]; instead of the guard).
    pub alternate_prefetch: Option<usize>,
    /// With a lookahead predictor, also forecast layers `l+1..l+D` after each layer
    /// (one more predictor query per layer on the decode thread).
    pub layer_forecasts: bool,
    /// Prefetch each layer's pre-attention-gate experts at the layer's start.
    pub pre_attention: bool,
    /// After each decode step's last MoE layer routes, prefetch the next token's
    /// first-layer experts forecast by the logit lens ([`NextTokenGate`]).
    pub lens: bool,
    /// Cache-aware routing margin in router-score units; 0 = off.
    pub routing_margin: f32,
    /// Background reader threads.
    pub loader_threads: usize,
    /// Chunks of one demand read in flight at once ([`DEFAULT_READ_STREAMS`]).
    pub read_streams: usize,
    /// Counts with a token table: at each decode step's start, every layer's `budget`
    /// most frequent experts for the token's id are prefetched.
    pub token_table: Option<predictor::baselines::BaselineStats>,
    /// Counts that start an online blend: after each layer routes, the experts it
    /// forecasts for the next [`OnlineBlend::HORIZON`] layers are prefetched (the engine
    /// takes the counts; the config it keeps has `None` here).
    pub blend: Option<predictor::baselines::BaselineStats>,
    /// Replay only: the oracle prefetcher, reading each layer's recorded experts this
    /// many layers ahead (counting on into the next token; at most one token), the
    /// bound the forecasters are measured against ([`OffloadEngine::replay_routing`]).
    pub oracle_lead: Option<usize>,
    /// With `oracle_lead` and `planned`: the oracle's reads are offered to the planner
    /// as certain forecasts (probability 1) instead of read in full, so a run measures
    /// what the planner itself leaves on the table.
    pub oracle_planned: bool,
    /// Planned: plan with these timings instead of the measured ones (decisions that do
    /// not depend on the machine's load: tests, or a simulator's setting reproduced).
    pub plan_timings: Option<PlanTimings>,
}

impl EngineConfig {
    /// Demand paging: `capacity` experts evicted by `policy`, no forecaster, no
    /// cache-aware routing, [`DEFAULT_LOADER_THREADS`] loader threads (set the other
    /// fields to add them).
    pub fn demand_paging(capacity: usize, policy: EvictionPolicy) -> EngineConfig {
        EngineConfig {
            capacity,
            policy,
            budget: 2,
            planned: false,
            prefetch_guard: false,
            alternate_prefetch: None,
            layer_forecasts: false,
            pre_attention: false,
            lens: false,
            routing_margin: 0.0,
            loader_threads: DEFAULT_LOADER_THREADS,
            read_streams: DEFAULT_READ_STREAMS,
            token_table: None,
            blend: None,
            oracle_lead: None,
            oracle_planned: false,
            plan_timings: None,
        }
    }
}

/// The runtime state; see the module docs.
pub struct OffloadEngine {
    cfg: EngineConfig,
    loader: ExpertLoader,
    cache: ExpertCache,
    resident: HashMap<usize, SwiGlu>,
    /// Reads queued or running.
    in_flight: HashMap<usize, InFlight>,
    unused_prefetch: HashSet<usize>,
    /// Model layer -> MoE index.
    moe_index: HashMap<usize, usize>,
    n_experts: usize,
    predictor: Option<OnlinePredictor>,
    /// The online blend (with `blend` counts).
    blend: Option<OnlineBlend>,
    tokens: Vec<u32>,
    /// This forward's routing per MoE index.
    routing: Vec<Vec<RouteDecision>>,
    decoding: bool,
    /// Forwards run (the decode step count, for deadlines), and the next MoE layer this
    /// forward routes.
    step: u64,
    next_layer: usize,
    started: Instant,
    pinned: Vec<usize>,
    /// The router input of the layer being routed (single-token steps), for predictors
    /// that read it.
    router_input: Option<Vec<f32>>,
    /// The logit lens (with `lens`).
    lens: Option<NextTokenGate>,
    /// Whether this forward's tokens went to the predictor yet.
    observed: bool,
    error: Option<ModelError>,
    report: EngineReport,
    planner: Option<planned::EnginePlanner>,
    /// Whether this decode step prefetches (planned, with the guard; or alternated).
    switch: Option<PrefetchSwitch>,
    /// Planned prefetches: the decode step they were read for, and the planner's moment
    /// (forward start or layer routing) they were issued at.
    planned_for: HashMap<usize, (u64, u64)>,
    /// With `oracle_lead`: the replayed sequence's routing, this decode step's position
    /// in it, and the first layer position (`token * n_moe + layer`) not yet read.
    future: Vec<Vec<Option<Vec<u16>>>>,
    position: usize,
    oracle_next: usize,
}

impl OffloadEngine {
    /// Drops `model`'s routed experts from memory and serves them from `ck`'s files.
    /// `predictor` (optional) must forecast this model's routing.
    pub fn new(
        ck: &Checkpoint,
        model: &mut MoeModel,
        mut cfg: EngineConfig,
        predictor: Option<OnlinePredictor>,
        device: &Device,
    ) -> Result<OffloadEngine> {
        if cfg.policy == EvictionPolicy::Belady {
            return Err(ModelError::Input(
                "belady needs the future routing: use it in `moecast simulate`, not in the engine"
                    .into(),
            ));
        }
        let shape = model.shape();
        let (m, e) = (shape.moe_layers.len(), shape.n_experts);
        if let Some(d) = predictor
            .as_ref()
            .and_then(|p| routing_mismatch(p.predictor().card.config.routing, &shape))
        {
            return Err(ModelError::Input(format!("the predictor forecasts {d}")));
        }
        if let Some(d) = cfg
            .blend
            .as_ref()
            .and_then(|c| routing_mismatch(c.shape, &shape))
        {
            return Err(ModelError::Input(format!("the blend's counts are of {d}")));
        }
        if cfg.capacity == 0 {
            return Err(ModelError::Input(
                "the expert cache needs at least one slot".into(),
            ));
        }
        let lens = if cfg.lens {
            let counts = predictor
                .as_ref()
                .and_then(|p| p.predictor().baselines.as_ref());
            Some(NextTokenGate::new(model)?.with_counts(counts)?)
        } else {
            None
        };
        let mut layers = model.sparse_layers_mut();
        let store =
            Arc::new(ExpertStore::open(ck, &layers, device)?.with_read_streams(cfg.read_streams));
        for moe in layers.iter_mut() {
            moe.offload_experts();
        }
        let capacity = cfg.capacity.min(m * e);
        // A prefetch delays a demand read by at most the chunk it is reading, on each
        // prefetch thread.
        let mean_bytes = (0..m * e)
            .map(|id| store.expert_bytes(id) as f64)
            .sum::<f64>()
            / (m * e).max(1) as f64;
        let direct_io = store.direct_io();
        // Planned, one loader thread is kept for demand reads.
        let loader = ExpertLoader::start(store, cfg.loader_threads, cfg.planned);
        let chunk_share =
            (loader.prefetch_threads() as f64 * READ_CHUNK as f64 / mean_bytes.max(1.0)).min(1.0);
        let learned = match &predictor {
            Some(p) if cfg.layer_forecasts && p.predictor().card.config.task == Task::Lookahead => {
                Some(("learned (next token + layer lookahead)", "layers"))
            }
            Some(_) => Some(("learned (next token)", "learned")),
            None => None,
        };
        let oracle = cfg.oracle_lead.map(|lead| {
            (
                format!("oracle (recorded experts, {lead} ahead)"),
                format!("oracle {lead}"),
            )
        });
        let (prefetch, prefetch_short) = report::prefetch_names(&[
            (
                learned.is_some(),
                learned.map_or("", |l| l.0),
                learned.map_or("", |l| l.1),
            ),
            (cfg.token_table.is_some(), "token table", "token"),
            (cfg.blend.is_some(), "online blend", "blend"),
            (cfg.pre_attention, "pre-attention gate", "gate"),
            (cfg.lens, "logit lens", "lens"),
            (
                oracle.is_some(),
                oracle.as_ref().map_or("", |o| o.0.as_str()),
                oracle.as_ref().map_or("", |o| o.1.as_str()),
            ),
        ]);
        let report = EngineReport {
            direct_io,
            policy: report::policy_name(cfg.policy),
            prefetch,
            prefetch_short,
            budget: match (
                learned.is_some()
                    || (cfg.oracle_lead.is_some() && cfg.oracle_planned)
                    || cfg.token_table.is_some()
                    || cfg.blend.is_some()
                    || cfg.pre_attention
                    || cfg.lens,
                cfg.planned,
            ) {
                (false, _) => "-".into(),
                (true, true) => "auto".into(),
                (true, false) => cfg.budget.to_string(),
            },
            capacity,
            total_experts: m * e,
            routing_margin: cfg.routing_margin,
            alternate_window: cfg.alternate_prefetch.unwrap_or(0),
            ..EngineReport::default()
        };
        if let Some(w) = cfg
            .alternate_prefetch
            .filter(|&w| w < AlternatingPrefetch::MIN_WINDOW)
        {
            return Err(ModelError::Input(format!(
                "alternating prefetch (--alternate-prefetch) every {w} decode steps: a window needs {} steps or more (its first step after a switch is not measured)",
                AlternatingPrefetch::MIN_WINDOW
            )));
        }
        if cfg.alternate_prefetch.is_some() && report.prefetch == "none" {
            return Err(ModelError::Input(
                "alternating prefetch (--alternate-prefetch) measures a prefetcher against none inside one run, and this run has none (--predictor, --token-table, --blend, --pre-attention, --lens or --oracle-prefetch)".into(),
            ));
        }
        let planner = (cfg.planned && report.budget == "auto").then(|| {
            planned::EnginePlanner::new(shape.top_k, e, m, capacity, chunk_share, cfg.plan_timings)
        });
        let switch = match cfg.alternate_prefetch {
            Some(window) => Some(PrefetchSwitch::Alternate(AlternatingPrefetch::new(window))),
            None => (cfg.prefetch_guard && planner.is_some()).then(|| {
                PrefetchSwitch::Guard(PrefetchGuard::new(GUARD_WINDOW, GUARD_EXPLORE_EVERY))
            }),
        };
        let blend = cfg
            .blend
            .take()
            .map(|c| OnlineBlend::new(c, OnlineBlend::HORIZON));
        Ok(OffloadEngine {
            blend,
            cache: ExpertCache::new(cfg.policy, CacheScope::Global, capacity, m, e),
            cfg,
            loader,
            resident: HashMap::new(),
            in_flight: HashMap::new(),
            unused_prefetch: HashSet::new(),
            moe_index: shape.moe_index(),
            n_experts: e,
            predictor,
            tokens: Vec::new(),
            routing: vec![Vec::new(); m],
            decoding: false,
            step: 0,
            next_layer: 0,
            started: Instant::now(),
            pinned: Vec::new(),
            router_input: None,
            lens,
            observed: false,
            error: None,
            report,
            switch,
            planner,
            planned_for: HashMap::new(),
            future: Vec::new(),
            position: 0,
            oracle_next: 0,
        })
    }

    /// How it runs.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// What has been measured so far.
    pub fn report(&self) -> &EngineReport {
        &self.report
    }

    /// Forgets the request's history (KV cache, the predictor's and the blend's recent
    /// tokens start over; the blend keeps its weights and counts); the resident experts
    /// stay, as in a server between requests.
    pub fn new_request(&mut self) {
        if let Some(p) = &mut self.predictor {
            p.reset();
        }
        if let Some(b) = &mut self.blend {
            b.start_request();
        }
        self.future.clear();
        self.oracle_next = 0;
    }

    /// Replay: the routing of the sequence about to run, token by token (per MoE layer),
    /// read by the oracle prefetcher (with `oracle_lead`; call after
    /// [`OffloadEngine::new_request`]).
    pub fn replay_routing(&mut self, experts: &[Vec<Option<Vec<u16>>>]) {
        if self.cfg.oracle_lead.is_some() {
            self.future = experts.to_vec();
        }
    }

    /// The oracle reads every recorded layer up to position `until` (`token * n_moe +
    /// layer`, at most one token past this decode step's current position) it has not
    /// read yet: after layer `l` routes, the one `lead` layers on; at a sequence's first
    /// decode step, its first `lead` layers. With `oracle_planned`, the planner judges
    /// each read.
    fn oracle_prefetch(&mut self, layer_done: Option<usize>) {
        let Some(lead) = self.cfg.oracle_lead else {
            return;
        };
        let n = self.n_moe();
        let lead = lead.clamp(1, n);
        let here = self.position * n + layer_done.map_or(0, |l| l + 1);
        let until = (here + lead).min(self.future.len() * n);
        let from = self.oracle_next.max(self.position * n);
        let future = std::mem::take(&mut self.future);
        for p in from..until {
            if self.cfg.oracle_planned && self.planner.is_some() {
                // Certain forecasts for the planner: what it leaves unread with them
                // is the planner's loss, not a forecaster's.
                let ids: Vec<u16> = future[p / n][p % n].iter().flatten().copied().collect();
                let mut probs = vec![0.0f32; self.n_experts];
                for &x in &ids {
                    probs[x as usize] = 1.0;
                }
                self.prefetch_ranked(p % n, &ids, Some(&probs));
                continue;
            }
            for &x in future[p / n][p % n].iter().flatten() {
                self.admit((p % n) * self.n_experts + x as usize, false);
            }
        }
        self.future = future;
        self.oracle_next = self.oracle_next.max(until);
    }

    fn n_moe(&self) -> usize {
        self.routing.len()
    }

    /// Takes finished reads without waiting.
    fn drain(&mut self) {
        while let Some(l) = self.loader.poll() {
            self.arrive(l);
        }
    }

    fn arrive(&mut self, l: Loaded) {
        self.report.read_s += l.read_time.as_secs_f64();
        if let Some(p) = &mut self.planner {
            p.read_done(l.read_time.as_secs_f64(), self.loader.link_use());
        }
        if l.stopped {
            // A prefetch its layer routed without, stopped between chunks; a read of it
            // asked for since is another.
            if self.in_flight.get(&l.id).is_some_and(|r| r.stopping) {
                self.in_flight.remove(&l.id);
            }
            self.report.bytes_prefetch += l.bytes;
            self.report.stopped_reads += 1;
            return;
        }
        let demand = self.in_flight.remove(&l.id).is_none_or(|r| r.demand);
        if demand {
            self.report.demand_reads += 1;
            self.report.bytes_demand += l.bytes;
        } else {
            self.report.prefetch_reads += 1;
            self.report.bytes_prefetch += l.bytes;
        }
        match l.expert {
            Err(e) => {
                self.error.get_or_insert(e);
            }
            Ok(expert) if self.cache.contains(l.id) => {
                if !demand {
                    self.unused_prefetch.insert(l.id);
                }
                self.resident.insert(l.id, expert);
            }
            Ok(_) if demand => self.report.wasted_demand_reads += 1,
            Ok(_) => self.report.wasted_reads += 1,
        }
    }

    fn evict(&mut self, id: usize) {
        self.resident.remove(&id);
        self.unused_prefetch.remove(&id);
        if self.in_flight.contains_key(&id) && self.loader.cancel(id) {
            self.in_flight.remove(&id);
        }
    }

    /// Makes `id` resident or arriving; a demand read jumps the prefetch queue.
    fn admit(&mut self, id: usize, demand: bool) {
        if self.cache.contains(id) {
            // A use; a prefetch of a resident expert keeps it (pinned) for now and tells
            // the policy when it is expected.
            if demand {
                self.cache.touch(id, 0);
            } else {
                self.cache.expect(id);
            }
        } else {
            let mut ins = if demand {
                self.cache.insert(id, 0, &self.pinned)
            } else {
                self.cache.stage(id, 0, &self.pinned)
            };
            if ins == Insertion::AllPinned {
                if !demand {
                    return;
                }
                ins = self.cache.insert(id, 0, &[]);
            }
            if let Insertion::Done { evicted: Some(v) } = ins {
                self.evict(v);
            }
            if !demand {
                self.cache.expect(id);
                self.report.prefetches += 1;
            }
        }
        self.pinned.push(id);
        match self.in_flight.get(&id) {
            Some(r) if !r.stopping && demand => self.loader.promote(id),
            Some(r) if !r.stopping => {}
            _ if self.resident.contains_key(&id) => {}
            _ => {
                let deadline = self.deadline(id / self.n_experts);
                self.loader.request(id, demand, deadline);
                self.in_flight.insert(
                    id,
                    InFlight {
                        demand,
                        deadline,
                        stopping: false,
                    },
                );
            }
        }
    }

    /// The position of MoE layer `m`'s next lookup, `step * n_moe + m`: this forward's
    /// if it has not routed yet, else the next one's.
    fn deadline(&self, m: usize) -> u64 {
        let step = self.step + u64::from(m < self.next_layer);
        step * self.n_moe() as u64 + m as u64
    }

    /// Whether a read of `id` is queued or running (and not being stopped).
    fn arriving(&self, id: usize) -> bool {
        self.in_flight.get(&id).is_some_and(|r| !r.stopping)
    }

    fn fail(&mut self, e: impl Into<ModelError>) {
        self.error.get_or_insert(e.into());
    }
}

/// A read queued or running: a demand read or a prefetch, and its lookup's position
/// ([`OffloadEngine::deadline`]).
#[derive(Debug, Clone, Copy)]
struct InFlight {
    demand: bool,
    deadline: u64,
    /// A started prefetch told to stop ([`ExpertLoader::stop`]).
    stopping: bool,
}

/// Where the routing `of` forecasts or counts is not `model`'s: "L MoE layers x E
/// experts (top-K), the model has ...".
pub(crate) fn routing_mismatch(
    of: datasets::examples::RoutingShape,
    model: &inference::ModelShape,
) -> Option<String> {
    let (m, e, k) = (model.moe_layers.len(), model.n_experts, model.top_k);
    ((of.n_moe, of.n_experts, of.top_k) != (m, e, k)).then(|| {
        format!(
            "{} MoE layers x {} experts (top-{}), the model has {m} x {e} (top-{k})",
            of.n_moe, of.n_experts, of.top_k
        )
    })
}
