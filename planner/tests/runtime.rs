//! A runtime that stages what [`StagingPlanner`] answers is not slower than the same
//! runtime reading on demand, over random routings, forecasts and timings. The runtime
//! is the one the planner assumes: one link that reads one expert at a time, a demand
//! read going ahead of every staged read not yet started but behind the one on the
//! link, and an LRU cache that a staged expert enters when its read is issued.

use planner::{LinkQueue, PlanTimings, StagingPlanner};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A staged read on the link: expert id, start and end (microseconds).
struct Staged {
    id: u32,
    start: f64,
    end: f64,
}

struct Runtime {
    read_us: f64,
    n_experts: usize,
    capacity: usize,
    /// Resident experts, least recently used first (staged ones included).
    lru: Vec<u32>,
    staged: Vec<Staged>,
    /// Staged experts not used since they were staged.
    unused: Vec<u32>,
    link_free: f64,
    now: f64,
    demand_reads: usize,
}

impl Runtime {
    fn new(read_us: f64, n_experts: usize, capacity: usize) -> Self {
        Runtime {
            read_us,
            n_experts,
            capacity,
            lru: Vec::new(),
            staged: Vec::new(),
            unused: Vec::new(),
            link_free: 0.0,
            now: 0.0,
            demand_reads: 0,
        }
    }

    /// Makes `id` resident, evicting the least recently used (not in `keep`); returns
    /// what went.
    fn admit(&mut self, id: u32, keep: &[u32]) -> Vec<u32> {
        self.lru.retain(|&x| x != id);
        let mut evicted = Vec::new();
        while self.lru.len() >= self.capacity {
            let Some(at) = self.lru.iter().position(|x| !keep.contains(x)) else {
                break;
            };
            let gone = self.lru.remove(at);
            self.staged.retain(|s| s.id != gone);
            evicted.push(gone);
        }
        self.lru.push(id);
        evicted
    }

    /// Stages `id` now, behind what the link has queued, unless it is resident; returns
    /// what it evicted.
    fn stage(&mut self, id: u32) -> Vec<u32> {
        if self.lru.contains(&id) {
            return Vec::new();
        }
        let start = self.now.max(self.link_free);
        self.link_free = start + self.read_us;
        self.staged.push(Staged {
            id,
            start,
            end: self.link_free,
        });
        self.unused.push(id);
        self.admit(id, &[])
    }

    /// A layer's lookup of `needed` now: waits for what is on the link, reads the rest on
    /// demand ahead of the staged reads not started; returns the misses.
    fn lookup(&mut self, needed: &[u32]) -> usize {
        let now = self.now;
        self.staged.retain(|s| s.end > now);
        let mut ready = now;
        let mut misses = Vec::new();
        for &x in needed {
            match self.staged.iter().position(|s| s.id == x) {
                Some(i) if self.staged[i].start <= now => ready = ready.max(self.staged[i].end),
                Some(i) => {
                    self.staged.remove(i);
                    misses.push(x);
                }
                None if self.lru.contains(&x) => {}
                None => misses.push(x),
            }
        }
        if !misses.is_empty() {
            // Behind the read on the link, ahead of the queued ones, which move back.
            let on_link = self.staged.iter().find(|s| s.start <= now).map(|s| s.end);
            let mut cursor = now.max(on_link.unwrap_or(now)) + misses.len() as f64 * self.read_us;
            ready = ready.max(cursor);
            for s in self.staged.iter_mut().filter(|s| s.start > now) {
                s.start = cursor;
                s.end = cursor + self.read_us;
                cursor = s.end;
            }
            self.link_free = self.link_free.max(cursor);
            self.demand_reads += misses.len();
        }
        for &x in needed {
            self.admit(x, needed);
        }
        // Staged experts their layer routed without go first.
        let layer = needed.first().map(|&x| x as usize / self.n_experts);
        let e = self.n_experts;
        let (wasted, kept): (Vec<u32>, Vec<u32>) = self
            .unused
            .iter()
            .filter(|x| !needed.contains(x))
            .partition(|&&x| Some(x as usize / e) == layer);
        self.unused = kept;
        for x in wasted {
            if let Some(at) = self.lru.iter().position(|&y| y == x) {
                self.lru.remove(at);
                self.lru.insert(0, x);
            }
        }
        self.now = ready;
        misses.len()
    }

    fn queue(&self) -> LinkQueue {
        LinkQueue {
            queued_reads: self.staged.iter().filter(|s| s.end > self.now).count(),
            free_slots: self.capacity.saturating_sub(self.lru.len()),
        }
    }
}

/// Routing with reuse from token to token and popular experts per layer.
fn routing(rng: &mut StdRng, tokens: usize, m: usize, e: usize, k: usize) -> Vec<Vec<Vec<u16>>> {
    let popular: Vec<Vec<u16>> = (0..m)
        .map(|_| (0..e as u16).collect::<Vec<_>>())
        .map(|mut v| {
            v.shuffle(rng);
            v
        })
        .collect();
    let mut out: Vec<Vec<Vec<u16>>> = Vec::with_capacity(tokens);
    for t in 0..tokens {
        let token = (0..m)
            .map(|l| {
                let mut set: Vec<u16> = Vec::with_capacity(k);
                while set.len() < k {
                    let x = if t > 0 && rng.random_bool(0.4) {
                        out[t - 1][l][rng.random_range(0..k)]
                    } else {
                        // Squared: the first experts of the layer's order are popular.
                        let u: f64 = rng.random();
                        popular[l][(u * u * e as f64) as usize]
                    };
                    if !set.contains(&x) {
                        set.push(x);
                    }
                }
                set
            })
            .collect();
        out.push(token);
    }
    out
}

struct Case {
    m: usize,
    e: usize,
    k: usize,
    capacity: usize,
    read_us: f64,
    layer_us: f64,
    recall: f64,
    wrong: usize,
    claimed: f32,
    horizon: usize,
    /// The first token forecast (the tokens before read on demand).
    start: usize,
}

/// Decodes `routes` and returns the time it took, the reads staged and the reads on
/// demand; with `plan`, staging what the planner answers to a forecaster of the case's
/// quality after each layer routes.
fn decode(c: &Case, routes: &[Vec<Vec<u16>>], plan: bool, seed: u64) -> (f64, u64, usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let timings = PlanTimings {
        read_us: c.read_us,
        layer_us: c.layer_us,
    };
    let mut planner = StagingPlanner::new(c.m, c.e, c.k, c.capacity, Some(timings)).unwrap();
    let mut rt = Runtime::new(c.read_us, c.e, c.capacity);
    let id = |l: usize, x: u16| (l * c.e) as u32 + u32::from(x);
    for (t, token) in routes.iter().enumerate() {
        planner.token_started();
        rt.now += c.layer_us;
        for (l, experts) in token.iter().enumerate() {
            let needed: Vec<u32> = experts.iter().map(|&x| id(l, x)).collect();
            let misses = rt.lookup(&needed);
            planner.layer_routed(l, experts, misses).unwrap();
            for ahead in 1..=c.horizon {
                let (tok, layer) = ((t * c.m + l + ahead) / c.m, (l + ahead) % c.m);
                if !plan || tok >= routes.len() || t < c.start {
                    continue;
                }
                let truth = &routes[tok][layer];
                let mut ranking: Vec<u16> = truth
                    .iter()
                    .copied()
                    .filter(|_| rng.random_bool(c.recall))
                    .collect();
                for _ in 0..c.wrong {
                    let x = rng.random_range(0..c.e as u16);
                    if !ranking.contains(&x) && !truth.contains(&x) {
                        ranking.push(x);
                    }
                }
                ranking.shuffle(&mut rng);
                let probs = vec![c.claimed; ranking.len()];
                let resident: Vec<bool> = ranking
                    .iter()
                    .map(|&x| rt.lru.contains(&id(layer, x)))
                    .collect();
                let staged = planner
                    .plan(
                        layer,
                        &ranking,
                        Some(&probs),
                        Some(&resident),
                        rt.queue(),
                        64,
                    )
                    .unwrap();
                for s in staged {
                    for gone in rt.stage(s) {
                        planner.evicted(gone).unwrap();
                    }
                }
            }
            rt.now += c.layer_us;
        }
    }
    (rt.now, planner.counts().issued, rt.demand_reads)
}

const CASES: u64 = 400;

/// Over 400 random cases staging is within 2.1% of reading on demand in the worst
/// (the planner's eviction cost counts only the expert a staged read evicts, not the
/// shorter life of the others, which matters in caches of about one token's experts)
/// and faster by 5% or more in about half of them. About a quarter of the cases have
/// reads longer than a layer: there the link is bound and the planner reads only for
/// the next lookup, above its break-even precision (with the expert it evicts at risk
/// added; without that one case lost 11.5%).
#[test]
fn staging_what_the_planner_answers_is_not_slower_than_reading_on_demand() {
    let mut worst = f64::INFINITY;
    let mut gained = 0;
    for seed in 0..CASES {
        let mut rng = StdRng::seed_from_u64(seed);
        let (m, e) = (rng.random_range(3..9), rng.random_range(8..65));
        let k = rng.random_range(1..5.min(e / 2));
        let layer_us = rng.random_range(100.0..1000.0);
        let c = Case {
            m,
            e,
            k,
            capacity: rng.random_range(2 * k..=(m * e / 2).max(2 * k)),
            // A read from a twentieth of a layer's time to three layers.
            read_us: layer_us * 10f64.powf(rng.random_range(-1.3..0.5)),
            layer_us,
            recall: rng.random_range(0.2..1.0),
            wrong: rng.random_range(0..6),
            claimed: rng.random_range(0.05..0.95),
            horizon: rng.random_range(1..4),
            start: 0,
        };
        let routes = routing(&mut rng, 200, m, e, k);
        let (demand, _, _) = decode(&c, &routes, false, seed);
        let (planned, staged, _) = decode(&c, &routes, true, seed);
        let ratio = demand / planned;
        worst = worst.min(ratio);
        gained += usize::from(ratio > 1.05);
        assert!(
            ratio >= 0.975,
            "seed {seed}: staged {staged} reads, {ratio:.3}x the speed of reading on demand \
             ({m} layers x {e} experts, top-{k}, cache {}, read {:.0} us, layer {:.0} us, \
             recall {:.2}, {} wrong, claimed {:.2}, horizon {})",
            c.capacity,
            c.read_us,
            c.layer_us,
            c.recall,
            c.wrong,
            c.claimed,
            c.horizon
        );
    }
    println!(
        "worst planned / on-demand speed over {CASES} random cases: {worst:.3}; {gained} faster by 5% or more"
    );
    assert!(
        gained >= 150,
        "only {gained} of {CASES} cases gained 5% or more"
    );
}

/// A sure forecast from the 30th token, reads a hundredth of a layer: nearly every
/// routed expert is staged ahead of use after that, also where the cache holds fewer
/// experts than a token routes (demand paging then misses at every lookup). The staging
/// limit once judged demand paging by the misses left after staging, which fall as
/// staging pays, and held such a forecast to one read a lookup, half of what it could
/// save.
#[test]
fn a_sure_forecast_is_staged_in_a_cache_smaller_than_a_token() {
    let (m, e, k) = (6, 16, 2);
    let routes = routing(&mut StdRng::seed_from_u64(7), 200, m, e, k);
    for capacity in [10, 24] {
        let c = Case {
            m,
            e,
            k,
            capacity,
            read_us: 10.0,
            layer_us: 1000.0,
            recall: 1.0,
            wrong: 0,
            claimed: 0.9,
            horizon: 2,
            start: 30,
        };
        let (_, _, on_demand) = decode(&c, &routes, false, 7);
        let (_, staged, planned) = decode(&c, &routes, true, 7);
        println!(
            "cache {capacity}: {on_demand} reads on demand; planned {planned}, {staged} staged"
        );
        assert!(
            planned * 5 < on_demand,
            "cache {capacity}: {planned} demand reads planned against {on_demand} on demand ({staged} staged)"
        );
    }
}
