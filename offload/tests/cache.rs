//! The expert cache's eviction policies against direct computations (textbook LRU,
//! Belady's OPT by look-ahead); `simulator.rs` checks the trace-driven simulator.

use offload::cache::{CacheScope, EvictionPolicy, ExpertCache, Insertion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Hits of a textbook LRU (a recency-ordered vector).
fn naive_lru(accesses: &[usize], capacity: usize) -> u64 {
    let mut order: Vec<usize> = Vec::new();
    let mut hits = 0;
    for &a in accesses {
        if let Some(i) = order.iter().position(|&x| x == a) {
            hits += 1;
            order.remove(i);
        } else if order.len() == capacity {
            order.remove(0);
        }
        order.push(a);
    }
    hits
}

/// Hits of Belady's OPT by direct look-ahead.
fn naive_opt(accesses: &[usize], capacity: usize) -> u64 {
    let mut set: Vec<usize> = Vec::new();
    let mut hits = 0;
    for (i, &a) in accesses.iter().enumerate() {
        if set.contains(&a) {
            hits += 1;
            continue;
        }
        if set.len() == capacity {
            let next = |x: usize| {
                accesses[i + 1..]
                    .iter()
                    .position(|&y| y == x)
                    .unwrap_or(usize::MAX)
            };
            let (victim, _) = set
                .iter()
                .enumerate()
                .max_by_key(|(_, &x)| next(x))
                .expect("full");
            set.remove(victim);
        }
        set.push(a);
    }
    hits
}

fn run(policy: EvictionPolicy, accesses: &[usize], capacity: usize, n: usize) -> u64 {
    let mut c = ExpertCache::new(policy, CacheScope::Global, capacity, 1, n);
    let mut hits = 0;
    for (i, &a) in accesses.iter().enumerate() {
        let next = accesses[i + 1..]
            .iter()
            .position(|&y| y == a)
            .map_or(u64::MAX, |p| (i + 1 + p) as u64);
        if c.contains(a) {
            hits += 1;
            c.touch(a, next);
        } else {
            assert!(matches!(c.insert(a, next, &[]), Insertion::Done { .. }));
        }
        assert!(c.resident().len() <= capacity);
    }
    hits
}

#[test]
fn lru_and_belady_match_direct_implementations() {
    let mut rng = StdRng::seed_from_u64(0);
    for trial in 0..20 {
        let n = 8 + trial % 5;
        let accesses: Vec<usize> = (0..400)
            .map(|_| {
                // Skewed: low ids are hot.
                let r: f64 = rng.random();
                ((r * r) * n as f64) as usize
            })
            .collect();
        for capacity in [1, 2, 3, 5] {
            let lru = run(EvictionPolicy::Lru, &accesses, capacity, n);
            assert_eq!(
                lru,
                naive_lru(&accesses, capacity),
                "trial {trial} cap {capacity}"
            );
            let opt = run(EvictionPolicy::Belady, &accesses, capacity, n);
            assert_eq!(
                opt,
                naive_opt(&accesses, capacity),
                "trial {trial} cap {capacity}"
            );
            let lfu = run(EvictionPolicy::Lfu { decay: 0.0 }, &accesses, capacity, n);
            assert!(opt >= lru && opt >= lfu, "OPT bounds demand paging");
        }
    }
}

#[test]
fn lfu_keeps_the_frequent_and_decay_forgets() {
    // a is used 5 times, then b and c alternate: plain LFU keeps a; with strong decay a
    // is forgotten and the recent pair stays.
    let (a, b, c) = (0usize, 1, 2);
    let mut acc = vec![a; 5];
    for _ in 0..6 {
        acc.extend([b, c]);
    }
    let plain = run(EvictionPolicy::Lfu { decay: 0.0 }, &acc, 2, 3);
    let decayed = run(EvictionPolicy::Lfu { decay: 2.0 }, &acc, 2, 3);
    assert_eq!(plain, 4, "a stays; b/c evict each other");
    assert!(decayed > plain, "{decayed} vs {plain}");
    assert!("lfu:0.5".parse::<EvictionPolicy>().is_ok());
    assert!("lfu:-1".parse::<EvictionPolicy>().is_err());
    assert!("mru".parse::<EvictionPolicy>().is_err());
}

#[test]
fn next_use_keeps_the_coming_layers_where_lru_thrashes() {
    // 4 layers that each use experts 0 and 1 every token: 8 experts in a cycle, 6 slots.
    let (m, n, tokens) = (4usize, 4usize, 50);
    let accesses: Vec<usize> = (0..tokens * m)
        .flat_map(|v| {
            let l = v % m;
            [l * n, l * n + 1]
        })
        .collect();
    let play = |policy: EvictionPolicy| {
        let mut c = ExpertCache::new(policy, CacheScope::Global, 6, m, n);
        let mut hits = 0;
        for pair in accesses.chunks(2) {
            c.visit(pair[0] / n, pair);
            for &a in pair {
                if c.contains(a) {
                    hits += 1;
                    c.touch(a, 0);
                } else {
                    assert!(matches!(c.insert(a, 0, pair), Insertion::Done { .. }));
                }
            }
        }
        hits
    };
    let opt = naive_opt(&accesses, 6);
    assert_eq!(play(EvictionPolicy::Lru), 0, "LRU evicts what comes next");
    let next_use = play(EvictionPolicy::NextUse);
    assert!(
        next_use as f64 >= 0.9 * opt as f64,
        "next-use {next_use} hits vs OPT {opt}"
    );
    assert!("next-use".parse::<EvictionPolicy>() == Ok(EvictionPolicy::NextUse));
}

#[test]
fn next_use_keeps_a_layers_experts_through_its_lookups() {
    // 2 layers that each use experts 0 and 1 every token, 3 slots; the callers pin each
    // expert as they look it up, so a miss on the first must not evict the second.
    let (m, n) = (2usize, 2usize);
    let mut c = ExpertCache::new(EvictionPolicy::NextUse, CacheScope::Global, 3, m, n);
    let (mut hits, mut accesses) = (0, 0);
    for v in 0..400 {
        let l = v % m;
        let used = [l * n, l * n + 1];
        c.visit(l, &used);
        let mut pinned = Vec::new();
        for a in used {
            pinned.push(a);
            accesses += 1;
            if c.contains(a) {
                hits += 1;
                c.touch(a, 0);
            } else {
                assert!(matches!(c.insert(a, 0, &pinned), Insertion::Done { .. }));
            }
        }
    }
    // OPT keeps 2 of the 4 experts and cycles the third slot: half the accesses hit.
    assert!(hits * 100 >= accesses * 45, "{hits} of {accesses}");
}
