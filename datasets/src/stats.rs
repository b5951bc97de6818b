//! Trace statistics: expert popularity, adjacent-token overlap, reuse distance,
//! cross-layer co-activation and per-layer LRU hit rates.
//!
//! Definitions (all per MoE layer, then over all layers):
//! - *adjacent-token overlap*: mean over (token t > 0 of a sequence, layer) of
//!   `|E_t ∩ E_{t-1}| / k`, skipping pairs where either side is not computed; the
//!   overall figure is the mean over all such pairs (micro average).
//! - *reuse distance*: for each expert access (a token's k experts at a layer, taken in
//!   rank order, sequences cold-started), the number of distinct experts of that layer
//!   accessed since the previous access of the same expert (its LRU stack depth);
//!   first accesses are counted apart as "cold".
//! - *LRU hit rate at capacity C*: hits / accesses of an LRU cache of C experts per
//!   layer over the same access stream; equal to the share of accesses with reuse
//!   distance < C, which is how it is computed (one pass gives every capacity).
//! - *co-activation*: counts of (expert i at MoE layer m, expert j at MoE layer m+1)
//!   over tokens where both are computed; `topk_recall` is the in-sample recall of
//!   predicting layer m+1's set as the k experts with the highest summed counts given
//!   layer m's set.

use serde::Serialize;

use crate::trace::{TraceMeta, TraceView};

/// Co-activation matrices are kept only up to this many experts per layer.
pub const MAX_COACTIVATION_EXPERTS: u32 = 1024;

/// Statistics of one MoE layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerStats {
    /// Model layer index.
    pub layer: u32,
    /// Expert accesses (k per computed token).
    pub accesses: u64,
    /// Distinct experts used at least once.
    pub experts_used: u32,
    /// Most used expert and its share of the accesses.
    pub top_expert: u32,
    pub top_share: f64,
    /// Share of the least used expert (0 when some expert is never used).
    pub min_share: f64,
    /// Entropy of the usage distribution in bits (max `log2 E`).
    pub entropy_bits: f64,
    /// Adjacent-token overlap and the number of pairs it averages.
    pub overlap: Option<f64>,
    pub overlap_pairs: u64,
    /// LRU hit rate for each capacity of [`TraceStats::lru_capacities`].
    pub lru_hit_rate: Vec<f64>,
}

/// Co-activation between two consecutive MoE layers.
#[derive(Debug, Clone, Serialize)]
pub struct Coactivation {
    pub from_layer: u32,
    pub to_layer: u32,
    /// The most frequent pairs: (expert at `from_layer`, expert at `to_layer`, count,
    /// P(j at to_layer | i at from_layer)).
    pub top_pairs: Vec<(u32, u32, u64, f64)>,
    /// In-sample recall of the co-activation top-k predictor (see module docs).
    pub topk_recall: f64,
}

/// One bucket of the reuse-distance histogram: distances in `[lo, hi]`.
#[derive(Debug, Clone, Serialize)]
pub struct ReuseBucket {
    pub lo: u32,
    pub hi: u32,
    pub count: u64,
}

/// All statistics of a trace.
#[derive(Debug, Clone, Serialize)]
pub struct TraceStats {
    pub model: String,
    pub tokens: usize,
    pub sequences: usize,
    pub moe_layers: usize,
    pub n_experts: u32,
    pub top_k: u32,
    pub ranked: bool,
    pub has_weights: bool,
    /// Share of (token, MoE layer) cells that were computed.
    pub computed_share: f64,
    /// Overlap two independent uniform top-k sets would have: k / E.
    pub random_overlap: f64,
    /// Adjacent-token overlap over all layers (micro average).
    pub overlap: Option<f64>,
    /// Capacities (experts per layer) of the LRU hit rates.
    pub lru_capacities: Vec<u32>,
    /// Overall LRU hit rate per capacity.
    pub lru_hit_rate: Vec<f64>,
    /// Reuse-distance histogram over all layers; `cold` counts first accesses.
    pub reuse_distance: Vec<ReuseBucket>,
    pub cold_accesses: u64,
    pub layers: Vec<LayerStats>,
    /// Consecutive MoE layer pairs (empty when E > [`MAX_COACTIVATION_EXPERTS`]).
    pub coactivation: Vec<Coactivation>,
    /// LRU hit rate at every capacity 1..=E (overall), for plots.
    #[serde(skip)]
    pub lru_curve: Vec<(u32, f64)>,
    /// P(j | i) of the first co-activation pair, row-major `E x E`, for plots.
    #[serde(skip)]
    pub first_coactivation_matrix: Option<Vec<f64>>,
}

/// The default LRU capacities: 10% and 25% of the experts (at least k).
pub fn default_lru_capacities(n_experts: u32, top_k: u32) -> Vec<u32> {
    let mut caps: Vec<u32> = [0.10, 0.25]
        .iter()
        .map(|f| ((n_experts as f64 * f).round() as u32).clamp(top_k, n_experts))
        .collect();
    caps.dedup();
    caps
}

/// Computes every statistic of `view`. `lru_capacities` are experts per layer.
pub fn compute(view: &TraceView<'_>, lru_capacities: &[u32]) -> TraceStats {
    let mut b = StatsBuilder::new(view.meta, lru_capacities);
    b.add(view);
    if b.needs_second_pass() {
        b.add_recall(view);
    }
    b.finish()
}

/// Co-activation counts of all layer pairs are kept only up to this many bytes.
pub const MAX_COACTIVATION_BYTES: usize = 256 << 20;

/// Accumulates the statistics of a trace given in pieces of whole sequences (the parts
/// of a dataset): [`StatsBuilder::add`] every piece, then, when
/// [`StatsBuilder::needs_second_pass`], [`StatsBuilder::add_recall`] every piece again
/// (the co-activation recall is in-sample: it needs the final counts). Memory is
/// independent of the trace length.
pub struct StatsBuilder {
    meta: TraceMeta,
    caps: Vec<u32>,
    tokens: usize,
    sequences: usize,
    has_weights: bool,
    computed: u64,
    usage: Vec<u64>,
    overlap_sum: Vec<f64>,
    overlap_pairs: Vec<u64>,
    /// `depth_hist[m][d]` = accesses at LRU stack depth `d`; index `e` = cold.
    depth_hist: Vec<u64>,
    /// `(n_moe - 1) x E x E` counts of (i at m, j at m + 1), when kept.
    coact: Option<Vec<u64>>,
    from_count: Vec<u64>,
    recall_hits: Vec<u64>,
    recall_total: Vec<u64>,
}

impl StatsBuilder {
    /// An empty builder for traces of `meta`'s shape.
    pub fn new(meta: &TraceMeta, lru_capacities: &[u32]) -> Self {
        let (e, n_moe) = (meta.n_experts as usize, meta.n_moe());
        let pairs = n_moe.saturating_sub(1);
        let keep = meta.n_experts <= MAX_COACTIVATION_EXPERTS
            && pairs > 0
            && pairs * e * e * 8 <= MAX_COACTIVATION_BYTES;
        StatsBuilder {
            meta: meta.clone(),
            caps: lru_capacities.to_vec(),
            tokens: 0,
            sequences: 0,
            has_weights: false,
            computed: 0,
            usage: vec![0; n_moe * e],
            overlap_sum: vec![0.0; n_moe],
            overlap_pairs: vec![0; n_moe],
            depth_hist: vec![0; n_moe * (e + 1)],
            coact: keep.then(|| vec![0; pairs * e * e]),
            from_count: vec![0; pairs * e],
            recall_hits: vec![0; pairs],
            recall_total: vec![0; pairs],
        }
    }

    /// Whether co-activation counts are kept, so the recall needs a second pass.
    pub fn needs_second_pass(&self) -> bool {
        self.coact.is_some()
    }

    /// First pass over a piece of whole sequences.
    pub fn add(&mut self, view: &TraceView<'_>) {
        let e = self.meta.n_experts as usize;
        let k = self.meta.top_k as usize;
        let n_moe = self.meta.n_moe();
        let seqs = view.sequence_ranges();
        self.tokens += view.n_tokens();
        self.sequences += seqs.len();
        self.has_weights |= view.weights.is_some();
        let mut stack: Vec<u16> = Vec::with_capacity(e);
        for m in 0..n_moe {
            for range in &seqs {
                stack.clear();
                let mut prev: Option<&[u16]> = None;
                for t in range.clone() {
                    let Some(ids) = view.layer(t, m) else {
                        prev = None;
                        continue;
                    };
                    self.computed += 1;
                    if let Some(p) = prev {
                        let inter = ids.iter().filter(|x| p.contains(x)).count();
                        self.overlap_sum[m] += inter as f64 / k as f64;
                        self.overlap_pairs[m] += 1;
                    }
                    prev = Some(ids);
                    for &x in ids {
                        self.usage[m * e + x as usize] += 1;
                        let depth = match stack.iter().position(|&s| s == x) {
                            Some(d) => {
                                stack.remove(d);
                                d
                            }
                            None => e,
                        };
                        stack.insert(0, x);
                        self.depth_hist[m * (e + 1) + depth] += 1;
                    }
                }
            }
        }
        if let Some(counts) = &mut self.coact {
            for m in 0..n_moe - 1 {
                let counts = &mut counts[m * e * e..(m + 1) * e * e];
                let from = &mut self.from_count[m * e..(m + 1) * e];
                for t in 0..view.n_tokens() {
                    if let (Some(a), Some(b)) = (view.layer(t, m), view.layer(t, m + 1)) {
                        for &i in a {
                            from[i as usize] += 1;
                            for &j in b {
                                counts[i as usize * e + j as usize] += 1;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Second pass: the in-sample recall of the co-activation predictor.
    pub fn add_recall(&mut self, view: &TraceView<'_>) {
        let Some(counts) = &self.coact else {
            return;
        };
        let e = self.meta.n_experts as usize;
        let k = self.meta.top_k as usize;
        let mut scores = vec![0u64; e];
        let mut order: Vec<usize> = (0..e).collect();
        for m in 0..self.meta.n_moe() - 1 {
            let counts = &counts[m * e * e..(m + 1) * e * e];
            for t in 0..view.n_tokens() {
                if let (Some(a), Some(b)) = (view.layer(t, m), view.layer(t, m + 1)) {
                    scores.fill(0);
                    for &i in a {
                        let row = &counts[i as usize * e..(i as usize + 1) * e];
                        for (s, c) in scores.iter_mut().zip(row) {
                            *s += c;
                        }
                    }
                    order.select_nth_unstable_by(k - 1, |&x, &y| {
                        scores[y].cmp(&scores[x]).then(x.cmp(&y))
                    });
                    self.recall_hits[m] += order[..k]
                        .iter()
                        .filter(|&&j| b.contains(&(j as u16)))
                        .count() as u64;
                    self.recall_total[m] += k as u64;
                }
            }
        }
    }

    /// The statistics of everything added.
    pub fn finish(self) -> TraceStats {
        let meta = &self.meta;
        let e = meta.n_experts as usize;
        let k = meta.top_k as usize;
        let n_moe = meta.n_moe();
        let hit_rate = |hist: &[u64], cap: u32| -> f64 {
            let total: u64 = hist.iter().sum();
            let hits: u64 = hist[..(cap as usize).min(e)].iter().sum();
            if total == 0 {
                0.0
            } else {
                hits as f64 / total as f64
            }
        };
        let mut all_hist = vec![0u64; e + 1];
        let mut layers = Vec::with_capacity(n_moe);
        for m in 0..n_moe {
            let hist = &self.depth_hist[m * (e + 1)..(m + 1) * (e + 1)];
            for (a, b) in all_hist.iter_mut().zip(hist) {
                *a += b;
            }
            let u = &self.usage[m * e..(m + 1) * e];
            let total: u64 = u.iter().sum();
            let (top_expert, &top) = u
                .iter()
                .enumerate()
                .max_by_key(|(_, c)| **c)
                .unwrap_or((0, &0));
            let share = |c: u64| {
                if total == 0 {
                    0.0
                } else {
                    c as f64 / total as f64
                }
            };
            let entropy_bits = u
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| {
                    let p = share(c);
                    -p * p.log2()
                })
                .sum();
            let pairs = self.overlap_pairs[m];
            layers.push(LayerStats {
                layer: meta.moe_layers[m],
                accesses: total,
                experts_used: u.iter().filter(|&&c| c > 0).count() as u32,
                top_expert: top_expert as u32,
                top_share: share(top),
                min_share: share(u.iter().copied().min().unwrap_or(0)),
                entropy_bits,
                overlap: (pairs > 0).then(|| self.overlap_sum[m] / pairs as f64),
                overlap_pairs: pairs,
                lru_hit_rate: self.caps.iter().map(|&c| hit_rate(hist, c)).collect(),
            });
        }
        let pairs: u64 = self.overlap_pairs.iter().sum();
        let (coactivation, first_coactivation_matrix) = self.coactivation();
        TraceStats {
            model: meta.model.clone(),
            tokens: self.tokens,
            sequences: self.sequences,
            moe_layers: n_moe,
            n_experts: meta.n_experts,
            top_k: meta.top_k,
            ranked: meta.ranked,
            has_weights: self.has_weights,
            computed_share: self.computed as f64 / (self.tokens * n_moe).max(1) as f64,
            random_overlap: k as f64 / e as f64,
            overlap: (pairs > 0).then(|| self.overlap_sum.iter().sum::<f64>() / pairs as f64),
            lru_capacities: self.caps.clone(),
            lru_hit_rate: self.caps.iter().map(|&c| hit_rate(&all_hist, c)).collect(),
            reuse_distance: reuse_buckets(&all_hist[..e], e as u32),
            cold_accesses: all_hist[e],
            layers,
            coactivation,
            lru_curve: (1..=meta.n_experts)
                .map(|c| (c, hit_rate(&all_hist, c)))
                .collect(),
            first_coactivation_matrix,
        }
    }

    fn coactivation(&self) -> (Vec<Coactivation>, Option<Vec<f64>>) {
        let Some(all) = &self.coact else {
            return (Vec::new(), None);
        };
        let e = self.meta.n_experts as usize;
        let mut out = Vec::new();
        let mut first = None;
        for m in 0..self.meta.n_moe() - 1 {
            let counts = &all[m * e * e..(m + 1) * e * e];
            let from_count = &self.from_count[m * e..(m + 1) * e];
            let mut pairs: Vec<(u32, u32, u64, f64)> = counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(idx, &c)| {
                    let (i, j) = (idx / e, idx % e);
                    (
                        i as u32,
                        j as u32,
                        c,
                        c as f64 / from_count[i].max(1) as f64,
                    )
                })
                .collect();
            pairs.sort_by(|x, y| y.2.cmp(&x.2).then((x.0, x.1).cmp(&(y.0, y.1))));
            pairs.truncate(10);
            if m == 0 {
                first = Some(
                    counts
                        .iter()
                        .enumerate()
                        .map(|(idx, &c)| c as f64 / from_count[idx / e].max(1) as f64)
                        .collect(),
                );
            }
            let total = self.recall_total[m];
            out.push(Coactivation {
                from_layer: self.meta.moe_layers[m],
                to_layer: self.meta.moe_layers[m + 1],
                top_pairs: pairs,
                topk_recall: if total == 0 {
                    0.0
                } else {
                    self.recall_hits[m] as f64 / total as f64
                },
            });
        }
        (out, first)
    }
}

/// Power-of-two buckets `[0,0], [1,1], [2,3], [4,7], ...` up to `e - 1`.
fn reuse_buckets(hist: &[u64], e: u32) -> Vec<ReuseBucket> {
    let mut out = Vec::new();
    let mut lo = 0u32;
    while lo < e {
        let hi = if lo == 0 { 0 } else { (lo * 2 - 1).min(e - 1) };
        out.push(ReuseBucket {
            lo,
            hi,
            count: hist[lo as usize..=hi as usize].iter().sum(),
        });
        lo = hi + 1;
    }
    out
}

/// Renders the statistics as a human-readable report.
pub fn render_table(s: &TraceStats) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let opt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
    let _ = writeln!(o, "model        {}", s.model);
    let _ = writeln!(
        o,
        "tokens       {} in {} sequences; {} MoE layers x {} experts, top-{} ({}{})",
        s.tokens,
        s.sequences,
        s.moe_layers,
        s.n_experts,
        s.top_k,
        if s.ranked { "ranked" } else { "unranked sets" },
        if s.has_weights { ", with weights" } else { "" }
    );
    let _ = writeln!(
        o,
        "computed     {} of (token, layer) cells",
        pct(s.computed_share)
    );
    let _ = writeln!(
        o,
        "overlap      {} adjacent-token (random baseline k/E = {:.3})",
        opt(s.overlap),
        s.random_overlap
    );
    for (c, h) in s.lru_capacities.iter().zip(&s.lru_hit_rate) {
        let _ = writeln!(
            o,
            "LRU          {} hit rate with {c} experts per layer",
            pct(*h)
        );
    }
    let _ = writeln!(o, "\nreuse distance (distinct experts in between)   count");
    for b in &s.reuse_distance {
        let label = if b.lo == b.hi {
            format!("{}", b.lo)
        } else {
            format!("{}-{}", b.lo, b.hi)
        };
        let _ = writeln!(o, "  {label:<44} {}", b.count);
    }
    let _ = writeln!(
        o,
        "  {:<44} {}",
        "cold (first use in sequence)", s.cold_accesses
    );
    let caps: Vec<String> = s
        .lru_capacities
        .iter()
        .map(|c| format!("LRU@{c}"))
        .collect();
    let _ = writeln!(
        o,
        "\nlayer  top expert  top share  min share  entropy(bits)  overlap  {}  next-layer co-act recall",
        caps.join("  ")
    );
    for (i, l) in s.layers.iter().enumerate() {
        let lru: Vec<String> = l
            .lru_hit_rate
            .iter()
            .zip(&caps)
            .map(|(h, c)| format!("{:>w$}", pct(*h), w = c.len()))
            .collect();
        let coact = s
            .coactivation
            .get(i)
            .map_or("-".into(), |c| format!("{:.3}", c.topk_recall));
        let _ = writeln!(
            o,
            "{:>5}  {:>10}  {:>9}  {:>9}  {:>13.2}  {:>7}  {}  {:>8}",
            l.layer,
            l.top_expert,
            pct(l.top_share),
            pct(l.min_share),
            l.entropy_bits,
            opt(l.overlap),
            lru.join("  "),
            coact
        );
    }
    o
}
