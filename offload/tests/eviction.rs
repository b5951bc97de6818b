//! Eviction keys: how the LFU policies count uses (a prefetch's read, uses kept across
//! evictions, their half-life) and how next-use estimates an expert's return.

use offload::cache::{CacheScope, EvictionPolicy, ExpertCache, Insertion, NextUseForecast};

/// A prefetched expert's first use is its first use: under LFU the prefetch's insertion
/// does not count as a use too, so a prefetch never makes an expert more frequent (and
/// so stickier) than reading it on demand would.
#[test]
fn under_lfu_a_prefetch_and_its_first_use_count_once() {
    let (a, b, c) = (0usize, 1, 2);
    let mut cache = ExpertCache::new(
        EvictionPolicy::Lfu { decay: 0.0 },
        CacheScope::Global,
        2,
        1,
        3,
    );
    // a: two uses; b: prefetched, then used once.
    assert!(matches!(
        cache.insert(a, 0, &[]),
        Insertion::Done { evicted: None }
    ));
    cache.touch(a, 0);
    assert!(matches!(
        cache.stage(b, 0, &[]),
        Insertion::Done { evicted: None }
    ));
    cache.touch(b, 0);
    // b is the less frequent: it goes for c, although a was used longer ago.
    assert_eq!(cache.victim(c, &[]), Some(Some(b)));
    // A second use counts: b is then as frequent as a, and the older a goes.
    cache.touch(b, 0);
    assert_eq!(cache.victim(c, &[]), Some(Some(a)));
    // Other policies: the first use is a use.
    let mut lru = ExpertCache::new(EvictionPolicy::Lru, CacheScope::Global, 2, 1, 3);
    lru.stage(b, 0, &[]);
    lru.insert(a, 0, &[]);
    lru.touch(b, 0);
    assert_eq!(lru.victim(c, &[]), Some(Some(a)));
}

#[test]
fn next_use_forecast_is_the_mean_residual_life_of_the_reuse_gaps() {
    // One layer of 4 experts: expert 0 used at visits 0, 1, 3 (gaps 1 and 2), expert 1
    // at visit 2; after 4 visits:
    let mut f = NextUseForecast::new(1, 4);
    for used in [[0usize], [0], [1], [0]] {
        f.visit(0, &used);
    }
    let residual = |f: &NextUseForecast, id| f.residual_visits(id);
    assert_eq!(residual(&f, 0), 1.5, "idle 0: mean gap (1 + 2) / 2");
    assert_eq!(residual(&f, 1), 1.0, "idle 1: gaps > 1 are {{2}}: 2 - 1");
    assert_eq!(
        residual(&f, 2),
        4.0,
        "never used in 4 visits: 4 more (> mean gap)"
    );
    // Used in 3 of 4 visits, where the average expert of the layer was used in 1: expert
    // 0 is expected back sooner than its idle time alone says, the unused later. Rates
    // (uses over the average's, 64-visit half-life, 4 visits of prior at 1): about
    // (3 / 1 + 4) / (4 + 4), (1 + 4) / 8 and 4 / 8.
    let (hot, once, cold) = (f.use_rate(0), f.use_rate(1), f.use_rate(2));
    for (rate, expected) in [(hot, 1.9893), (once, 1.0027), (cold, 0.5040)] {
        assert!((rate - expected).abs() < 1e-4, "{rate} vs {expected}");
    }
    // 4 steps so far, 1000 units each; the estimate is the residual life over the rate.
    let expect = |f: &NextUseForecast, id: usize, steps: f64| {
        (1000.0 * (steps + f.residual_visits(id) / f.use_rate(id))) as u64
    };
    assert_eq!(f.next_use(0), expect(&f, 0, 4.0));
    assert_eq!(f.next_use(2), expect(&f, 2, 4.0));
    assert!(f.next_use(0) < 5500 && f.next_use(2) > 8000);
    assert_eq!(f.prefetched(3), 5000, "prefetched: the coming visit");
    // Three layers of 2 experts (ids layer * 2 + expert); visits 0, 1, 2, then 0 again:
    // a visit of a layer is 3 steps.
    let mut f = NextUseForecast::new(3, 2);
    for (l, used) in [(0, 0usize), (1, 2), (2, 4), (0, 0)] {
        f.visit(l, &[used]);
    }
    let cycle = |f: &NextUseForecast, id: usize, since: f64| {
        (1000.0 * (4.0 + 3.0 * f.residual_visits(id) / f.use_rate(id) - since)) as u64
    };
    assert_eq!(f.residual_visits(0), 1.0, "layer 0 just ran: gap 1");
    assert_eq!(f.next_use(0), cycle(&f, 0, 0.0));
    assert_eq!(
        f.residual_visits(2),
        2.0,
        "layer 1 has no gaps yet: 2 visits (its expert count)"
    );
    assert_eq!(f.next_use(2), cycle(&f, 2, 2.0), "layer 1 ran 2 steps ago");
    assert_eq!(f.prefetched(2), 5000, "layer 1 is next");
    assert_eq!(f.prefetched(0), 7000, "layer 0 comes round in 3 steps");
}

/// The kept LFU (the llama.cpp harnesses' eviction) remembers an expert's uses while it
/// is out of the cache, forgets them at its half-life, and keeps no count for a staged
/// read that was never used.
#[test]
fn kept_lfu_remembers_uses_across_evictions_and_forgets_with_its_half_life() {
    let (a, b, c, d) = (0usize, 1, 2, 3);
    let kept = |half_life| EvictionPolicy::LfuKept { half_life };
    let new = |policy| ExpertCache::new(policy, CacheScope::Global, 2, 1, 4);
    // a: 3 uses, pushed out while b (2 uses) is pinned, then read back in.
    let come_back = |policy| {
        let mut cache = new(policy);
        cache.insert(a, 0, &[]);
        cache.touch(a, 0);
        cache.touch(a, 0);
        cache.insert(b, 0, &[]);
        cache.touch(b, 0);
        assert_eq!(
            cache.insert(c, 0, &[b]),
            Insertion::Done { evicted: Some(a) }
        );
        assert_eq!(
            cache.insert(a, 0, &[]),
            Insertion::Done { evicted: Some(c) }
        );
        cache.victim(d, &[])
    };
    assert_eq!(come_back(kept(1e9)), Some(Some(b)), "a is back with 4 uses");
    assert_eq!(
        come_back(EvictionPolicy::Lfu { decay: 0.0 }),
        Some(Some(a)),
        "plain LFU starts a's count anew"
    );
    // Half-life: a's 3 uses against b's 2, the second five visits (tokens) later, or a
    // prompt's batch of five tokens later.
    for (half_life, victim, batch) in [(1e9, b, false), (0.5, a, false), (0.5, a, true)] {
        let mut cache = new(kept(half_life));
        cache.insert(a, 0, &[]);
        cache.touch(a, 0);
        cache.touch(a, 0);
        cache.insert(b, 0, &[]);
        if batch {
            cache.batch_passed(5);
        } else {
            for _ in 0..5 {
                cache.visit(0, &[]);
            }
        }
        cache.touch(b, 0);
        assert_eq!(
            cache.victim(c, &[]),
            Some(Some(victim)),
            "half-life {half_life}, batch {batch}"
        );
    }
    // b staged, dropped unused, read in again: one use, not two.
    let mut cache = new(kept(1e9));
    cache.insert(a, 0, &[]);
    cache.stage(b, 0, &[]);
    assert_eq!(
        cache.insert(c, 0, &[a]),
        Insertion::Done { evicted: Some(b) }
    );
    cache.touch(c, 0);
    assert_eq!(
        cache.insert(b, 0, &[]),
        Insertion::Done { evicted: Some(a) }
    );
    assert_eq!(cache.victim(d, &[]), Some(Some(b)), "b: 1 use, c: 2");
    // b used twice, then pushed out (c, used twice, pinned) and staged again.
    let b_staged_again = || {
        let mut cache = new(kept(1e9));
        cache.insert(b, 0, &[]);
        cache.touch(b, 0);
        cache.insert(c, 0, &[b]);
        cache.touch(c, 0);
        assert_eq!(
            cache.insert(a, 0, &[c]),
            Insertion::Done { evicted: Some(b) }
        );
        assert_eq!(
            cache.stage(b, 0, &[c]),
            Insertion::Done { evicted: Some(a) }
        );
        cache
    };
    // Used: its 2 earlier uses and this one, above c's 2.
    let mut cache = b_staged_again();
    cache.touch(b, 0);
    assert_eq!(cache.victim(d, &[]), Some(Some(c)), "b: 2 kept + 1, c: 2");
    // Removed unused (a cancelled prefetch): it keeps its 2 uses, not 3, so read in
    // again it has 3 against c's 4 and goes first, though used more recently (counting
    // the staging, 4 against 4, the older c would go).
    let mut cache = b_staged_again();
    cache.remove(b);
    cache.touch(c, 0);
    cache.touch(c, 0);
    cache.insert(b, 0, &[]);
    assert_eq!(cache.victim(d, &[]), Some(Some(b)), "b: 2 + 1, c: 4");
    assert!("lfu-kept".parse::<EvictionPolicy>() == Ok(kept(EvictionPolicy::HALF_LIFE)));
    assert!("lfu-kept:16".parse::<EvictionPolicy>() == Ok(kept(16.0)));
    for bad in [
        "lfu-kept:0",
        "lfu-kept:-2",
        "lfu-kept:x",
        "lfu-kept:inf",
        "lfu-kept:1e-310",
    ] {
        assert!(bad.parse::<EvictionPolicy>().is_err(), "{bad}");
    }
}
