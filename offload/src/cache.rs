//! `ExpertCache`: the bounded set of experts resident in fast memory.
//!
//! Experts are numbered `layer * n_experts + expert`. Capacity is a number of experts,
//! either one pool for all layers or the same share for every layer. Every eviction
//! policy is "evict the resident expert with the smallest key", with the key kept in a
//! min-queue that is updated lazily (stale entries are skipped when popped). LRU keys
//! only grow, so its queue is a plain FIFO; the others use a binary heap:
//!
//! - **LRU**: key = time of the last use;
//! - **LFU**: key = exponentially decayed use count, `log Σ_i exp(λ t_i)` over the use
//!   times `t_i` (all counts decay at the same rate, so the order is time-independent
//!   and a key only changes when its expert is used; `λ = 0` is plain LFU), ties broken
//!   by recency; an expert's count starts anew each time it is read in;
//! - **kept LFU** (`lfu-kept`): the same key over every use since the start, kept while
//!   the expert is out of the cache, each use's weight halving every `half_life` tokens
//!   (layer visits over layers), as the llama.cpp harnesses drop experts;
//! - **Belady / OPT**: key = minus the time of the next use (the expert needed furthest
//!   in the future goes first); the caller supplies next-use times from the known
//!   future, which makes it the bound of any demand-paging policy.
//! - **next-use**: Belady with the future estimated ([`NextUseForecast`]): key = minus
//!   the expected time of the next use. It knows that every layer comes round once per
//!   token, so, unlike LRU, it does not evict the experts of the layer that is about to
//!   run for those of the layer that just ran. The caller reports each layer's routing
//!   ([`ExpertCache::visit`]) and each prefetch's target ([`ExpertCache::expect`]).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

pub use planner::NextUseForecast;

/// Resident experts: a count, or a share of all routed experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheSize {
    Experts(usize),
    Fraction(f64),
}

impl std::str::FromStr for CacheSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_suffix('%') {
            match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(CacheSize::Fraction(p / 100.0)),
                _ => Err(format!("cache size '{s}' must be a percentage in (0, 100]")),
            }
        } else {
            match s.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(CacheSize::Experts(n)),
                _ => Err(format!("cache size '{s}' must be N (experts, >= 1) or P%")),
            }
        }
    }
}

impl CacheSize {
    /// Experts, out of `total`.
    pub fn experts(self, total: usize) -> usize {
        match self {
            CacheSize::Experts(n) => n.min(total),
            CacheSize::Fraction(f) => ((f * total as f64).round() as usize).clamp(1, total),
        }
    }
}

/// Which resident expert to drop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EvictionPolicy {
    Lru,
    /// Decay rate `λ` per access tick (0 = plain LFU).
    Lfu {
        decay: f64,
    },
    /// LFU over all uses, kept across evictions; a use's weight halves every
    /// `half_life` tokens.
    LfuKept {
        half_life: f64,
    },
    Belady,
    /// Belady with the next use estimated from the layer cycle and past reuse gaps.
    NextUse,
}

impl std::str::FromStr for EvictionPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lru" => Ok(EvictionPolicy::Lru),
            "lfu" => Ok(EvictionPolicy::Lfu { decay: 0.0 }),
            "belady" | "opt" => Ok(EvictionPolicy::Belady),
            "next-use" => Ok(EvictionPolicy::NextUse),
            "lfu-kept" => Ok(EvictionPolicy::LfuKept {
                half_life: Self::HALF_LIFE,
            }),
            _ if s.starts_with("lfu-kept:") => s
                .strip_prefix("lfu-kept:")
                .and_then(|t| t.parse::<f64>().ok())
                .filter(|t| *t >= 1e-3 && t.is_finite())
                .map(|half_life| EvictionPolicy::LfuKept { half_life })
                .ok_or_else(|| {
                    format!("bad half-life in '{s}' (lfu-kept:TOKENS, TOKENS >= 0.001)")
                }),
            _ => match s.strip_prefix("lfu:") {
                Some(d) => d
                    .parse::<f64>()
                    .ok()
                    .filter(|d| *d >= 0.0 && d.is_finite())
                    .map(|decay| EvictionPolicy::Lfu { decay })
                    .ok_or_else(|| format!("bad LFU decay in '{s}' (lfu:RATE, RATE >= 0)")),
                None => Err(format!(
                    "unknown eviction policy '{s}' (lru, lfu, lfu:DECAY, lfu-kept, lfu-kept:TOKENS, belady, next-use)"
                )),
            },
        }
    }
}

impl EvictionPolicy {
    /// The kept LFU's default half-life in tokens (the llama.cpp harnesses' too). In the
    /// engine a prompt's batch moves the clock by its tokens
    /// ([`ExpertCache::batch_passed`]).
    pub const HALF_LIFE: f64 = 64.0;

    fn counts_uses(self) -> bool {
        matches!(
            self,
            EvictionPolicy::Lfu { .. } | EvictionPolicy::LfuKept { .. }
        )
    }
}

/// What [`ExpertCache::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insertion {
    /// Inserted, evicting this expert if the pool was full.
    Done { evicted: Option<usize> },
    /// Not inserted: every eviction candidate is pinned.
    AllPinned,
}

/// One pool for all layers, or an equal share per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    Global,
    PerLayer,
}

/// A total-ordered f64 for heap keys.
#[derive(Debug, Clone, Copy)]
struct Key(f64, u64);

impl PartialEq for Key {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o).is_eq()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Key {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

/// Entry of a key queue: (key, expert, version).
type Entry = (Key, u32, u32);

/// A min-queue of keys: a FIFO when keys arrive in increasing order (LRU), else a heap.
#[derive(Debug, Clone)]
enum KeyQueue {
    Fifo(std::collections::VecDeque<Entry>),
    Heap(BinaryHeap<Reverse<Entry>>),
}

impl KeyQueue {
    fn push(&mut self, e: Entry) {
        match self {
            KeyQueue::Fifo(q) => q.push_back(e),
            KeyQueue::Heap(h) => h.push(Reverse(e)),
        }
    }

    fn pop(&mut self) -> Option<Entry> {
        match self {
            KeyQueue::Fifo(q) => q.pop_front(),
            KeyQueue::Heap(h) => h.pop().map(|Reverse(e)| e),
        }
    }

    /// Puts back entries popped in order (smallest first).
    fn restore(&mut self, popped: Vec<Entry>) {
        match self {
            KeyQueue::Fifo(q) => popped.into_iter().rev().for_each(|e| q.push_front(e)),
            KeyQueue::Heap(h) => popped.into_iter().for_each(|e| h.push(Reverse(e))),
        }
    }

    fn len(&self) -> usize {
        match self {
            KeyQueue::Fifo(q) => q.len(),
            KeyQueue::Heap(h) => h.len(),
        }
    }

    fn retain(&mut self, keep: impl Fn(&Entry) -> bool) {
        match self {
            KeyQueue::Fifo(q) => q.retain(|e| keep(e)),
            KeyQueue::Heap(h) => h.retain(|Reverse(e)| keep(e)),
        }
    }
}

/// One eviction pool.
#[derive(Debug, Clone)]
struct Pool {
    capacity: usize,
    len: usize,
    keys: KeyQueue,
}

/// The resident set of experts.
#[derive(Debug, Clone)]
pub struct ExpertCache {
    policy: EvictionPolicy,
    n_experts: usize,
    scope: CacheScope,
    pools: Vec<Pool>,
    resident: Vec<bool>,
    /// Current key and its version per expert.
    key: Vec<Key>,
    version: Vec<u32>,
    /// LFU: the key an expert's count resumes from when read in (its kept count under
    /// the kept LFU, none under plain LFU), and whether it was staged (read for a coming
    /// use) and not used since.
    prior: Vec<f64>,
    staged: Vec<bool>,
    tick: u64,
    /// Layer visits so far (the kept LFU's clock).
    visits: u64,
    n_layers: usize,
    /// Next-use estimates (next-use policy only).
    forecast: Option<NextUseForecast>,
}

impl ExpertCache {
    /// A cache of `capacity` experts over `n_layers x n_experts` (per layer: `capacity`
    /// is split evenly, at least one each).
    pub fn new(
        policy: EvictionPolicy,
        scope: CacheScope,
        capacity: usize,
        n_layers: usize,
        n_experts: usize,
    ) -> Self {
        let pools = match scope {
            CacheScope::Global => vec![capacity],
            CacheScope::PerLayer => {
                let base = capacity / n_layers;
                let extra = capacity % n_layers;
                (0..n_layers)
                    .map(|l| (base + usize::from(l < extra)).max(1))
                    .collect()
            }
        };
        let total = n_layers * n_experts;
        ExpertCache {
            policy,
            n_experts,
            scope,
            pools: pools
                .into_iter()
                .map(|capacity| Pool {
                    capacity: capacity.max(1),
                    len: 0,
                    keys: match policy {
                        EvictionPolicy::Lru => KeyQueue::Fifo(Default::default()),
                        _ => KeyQueue::Heap(BinaryHeap::new()),
                    },
                })
                .collect(),
            resident: vec![false; total],
            key: vec![Key(f64::NEG_INFINITY, 0); total],
            version: vec![0; total],
            prior: vec![f64::NEG_INFINITY; total],
            staged: vec![false; total],
            tick: 0,
            visits: 0,
            n_layers: n_layers.max(1),
            forecast: (policy == EvictionPolicy::NextUse)
                .then(|| NextUseForecast::new(n_layers, n_experts)),
        }
    }

    /// Experts the cache can hold in all.
    pub fn capacity(&self) -> usize {
        self.pools.iter().map(|p| p.capacity).sum()
    }

    /// Whether expert `id` is resident.
    #[inline]
    pub fn contains(&self, id: usize) -> bool {
        self.resident[id]
    }

    fn pool_of(&self, id: usize) -> usize {
        match self.scope {
            CacheScope::Global => 0,
            CacheScope::PerLayer => id / self.n_experts,
        }
    }

    fn set_key(&mut self, id: usize, key: Key) {
        self.key[id] = key;
        self.version[id] = self.version[id].wrapping_add(1);
        let p = self.pool_of(id);
        self.pools[p].keys.push((key, id as u32, self.version[id]));
        if self.pools[p].keys.len() > 8 * self.pools[p].capacity + 64 {
            self.compact(p);
        }
    }

    fn compact(&mut self, p: usize) {
        let (resident, version) = (&self.resident, &self.version);
        self.pools[p].keys.retain(|&(_, id, v)| {
            let i = id as usize;
            resident[i] && version[i] == v
        });
    }

    /// Records a use of `id` (resident or just inserted). `next_use` is the time of its
    /// next use (Belady only; `u64::MAX` when never). The first use of a staged expert
    /// replaces its staging's provisional use, so under LFU a prefetch leaves an expert
    /// no more frequent than reading it on demand would.
    pub fn touch(&mut self, id: usize, next_use: u64) {
        if std::mem::take(&mut self.staged[id]) {
            self.key[id].0 = self.prior[id];
        }
        let next_use = self.forecast.as_ref().map_or(next_use, |f| f.next_use(id));
        self.rekey(id, next_use);
    }

    fn rekey(&mut self, id: usize, next_use: u64) {
        self.tick += 1;
        let key = match self.policy {
            EvictionPolicy::Lru => Key(self.tick as f64, self.tick),
            EvictionPolicy::Lfu { decay } => self.lfu_key(id, decay * self.tick as f64),
            EvictionPolicy::LfuKept { half_life } => {
                let tokens = self.visits as f64 / self.n_layers as f64;
                self.lfu_key(id, std::f64::consts::LN_2 * tokens / half_life)
            }
            EvictionPolicy::Belady | EvictionPolicy::NextUse => Key(-(next_use as f64), self.tick),
        };
        self.set_key(id, key);
    }

    /// `id`'s LFU key with one more use of log-weight `add`: `log(exp(key) + exp(add))`.
    fn lfu_key(&self, id: usize, add: f64) -> Key {
        let old = self.key[id].0;
        let k = if old == f64::NEG_INFINITY {
            add
        } else {
            let m = old.max(add);
            m + ((old - m).exp() + (add - m).exp()).ln()
        };
        Key(k, self.tick)
    }

    /// Reports that MoE layer `layer` routed to `used` (call before their lookups). The
    /// kept LFU's clock counts the visits; the next-use policy learns the reuse gaps: the
    /// layer's resident experts in `used` are needed now (their lookups then re-key them),
    /// the others are expected at a later visit.
    pub fn visit(&mut self, layer: usize, used: &[usize]) {
        self.visits += 1;
        let Some(f) = self.forecast.as_mut() else {
            return;
        };
        debug_assert!(used.iter().all(|&id| id / self.n_experts == layer));
        f.visit(layer, used);
        let now = f.now();
        let e = self.n_experts;
        for id in layer * e..(layer + 1) * e {
            if !self.resident[id] {
                continue;
            }
            if used.contains(&id) {
                self.rekey(id, now);
            } else {
                self.touch(id, 0);
            }
        }
    }

    /// Reports that a batch of `tokens` tokens (a prompt's) passed an MoE layer: the kept
    /// LFU's clock moves as that many visits would. The next-use policy learns no reuse
    /// gaps from a batch, which is not one visit.
    pub fn batch_passed(&mut self, tokens: usize) {
        self.visits += tokens as u64;
    }

    /// Reports that resident `id` was prefetched for the coming visit of its layer. Only
    /// the next-use policy listens: it expects the expert then.
    pub fn expect(&mut self, id: usize) {
        if let Some(next_use) = self.forecast.as_ref().map(|f| f.prefetched(id)) {
            if self.resident[id] {
                self.rekey(id, next_use);
            }
        }
    }

    /// Inserts `id` (not resident), evicting per the policy unless one of `pinned` would
    /// go (see [`Insertion`]).
    /// The inserted expert counts as used now (`next_use` as in [`Self::touch`]).
    pub fn insert(&mut self, id: usize, next_use: u64, pinned: &[usize]) -> Insertion {
        self.read_in(id, next_use, pinned, false)
    }

    /// Inserts `id` for a coming use (a prefetch), as [`Self::insert`]; under LFU the
    /// read counts as a provisional use, replaced by its first use ([`Self::touch`]) and
    /// dropped if the expert leaves unused.
    pub fn stage(&mut self, id: usize, next_use: u64, pinned: &[usize]) -> Insertion {
        self.read_in(id, next_use, pinned, true)
    }

    fn read_in(&mut self, id: usize, next_use: u64, pinned: &[usize], staged: bool) -> Insertion {
        // Not resident, so not staged either (dropping an expert clears its mark).
        debug_assert!(!self.resident[id] && !self.staged[id]);
        let p = self.pool_of(id);
        let mut evicted = None;
        if self.pools[p].len >= self.pools[p].capacity {
            let mut skipped = Vec::new();
            loop {
                let Some(entry) = self.pools[p].keys.pop() else {
                    self.pools[p].keys.restore(skipped);
                    return Insertion::AllPinned;
                };
                let (_, vid, v) = entry;
                let vi = vid as usize;
                if !self.resident[vi] || self.version[vi] != v {
                    continue;
                }
                if pinned.contains(&vi) {
                    skipped.push(entry);
                    continue;
                }
                self.drop_resident(vi);
                evicted = Some(vi);
                break;
            }
            self.pools[p].keys.restore(skipped);
        }
        self.resident[id] = true;
        self.pools[p].len += 1;
        if self.policy.counts_uses() {
            self.prior[id] = match self.policy {
                EvictionPolicy::LfuKept { .. } => self.key[id].0,
                _ => f64::NEG_INFINITY,
            };
            self.key[id].0 = self.prior[id];
        }
        self.touch(id, next_use);
        self.staged[id] = staged && self.policy.counts_uses();
        Insertion::Done { evicted }
    }

    /// The expert that inserting `id` would evict: `Some(None)` when a slot is free,
    /// `None` when every candidate is in `pinned`.
    pub fn victim(&mut self, id: usize, pinned: &[usize]) -> Option<Option<usize>> {
        let p = self.pool_of(id);
        if self.pools[p].len < self.pools[p].capacity {
            return Some(None);
        }
        let mut skipped = Vec::new();
        let mut found = None;
        while let Some(entry) = self.pools[p].keys.pop() {
            let (_, vid, v) = entry;
            let vi = vid as usize;
            if !self.resident[vi] || self.version[vi] != v {
                continue;
            }
            skipped.push(entry);
            if !pinned.contains(&vi) {
                found = Some(vi);
                break;
            }
        }
        self.pools[p].keys.restore(skipped);
        found.map(Some)
    }

    /// Drops resident `id` (a cancelled prefetch).
    pub fn remove(&mut self, id: usize) {
        if self.resident[id] {
            self.version[id] = self.version[id].wrapping_add(1);
            self.drop_resident(id);
        }
    }

    /// Marks `id` gone; a staged expert that was never used keeps only its earlier uses.
    fn drop_resident(&mut self, id: usize) {
        self.resident[id] = false;
        let p = self.pool_of(id);
        self.pools[p].len -= 1;
        if std::mem::take(&mut self.staged[id]) {
            self.key[id].0 = self.prior[id];
        }
    }

    /// Resident experts, ascending.
    pub fn resident(&self) -> Vec<usize> {
        (0..self.resident.len())
            .filter(|&i| self.resident[i])
            .collect()
    }
}
