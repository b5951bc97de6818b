//! Set-prediction metrics, as the field defines them.
//!
//! For each (token, MoE layer) a predictor ranks the experts; its predicted set is the
//! top `k` of the ranking and the truth is the router's top-`k` set. Counting over all
//! (token, layer) pairs (micro average):
//!
//! - **precision / recall / F1**: of the active class (expert in the set). With
//!   `|predicted| = |true| = k` the three are equal; all three are reported.
//! - **exact-set accuracy**: share of (token, layer) pairs whose set is exactly right.
//! - **recall@B**: share of true experts inside the top `B` of the ranking (a prefetch
//!   budget of `B` experts per layer).
//! - **element-wise accuracy**: share of the `E` per-expert yes/no decisions that are
//!   right, over the flattened token x layer x expert matrix.
//! - **macro-F1**: the mean of the active-class F1 and the inactive-class F1 over that
//!   matrix (sklearn `f1_score(average="macro")`, the figure MoE-Beyond reports).

use serde::{Deserialize, Serialize};

/// Raw counts for one MoE layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetCounts {
    /// (token, layer) pairs counted.
    pub sets: u64,
    pub true_pos: u64,
    pub false_pos: u64,
    pub false_neg: u64,
    pub true_neg: u64,
    /// Pairs whose predicted set equals the true set.
    pub exact: u64,
    /// True experts found within the top `B` of the ranking.
    pub hits_at_budget: u64,
    /// True experts in all.
    pub true_total: u64,
}

impl SetCounts {
    /// Adds another layer's (or method's) counts.
    pub fn merge(&mut self, o: &SetCounts) {
        self.sets += o.sets;
        self.true_pos += o.true_pos;
        self.false_pos += o.false_pos;
        self.false_neg += o.false_neg;
        self.true_neg += o.true_neg;
        self.exact += o.exact;
        self.hits_at_budget += o.hits_at_budget;
        self.true_total += o.true_total;
    }

    /// The figures these counts give.
    pub fn summary(&self) -> SetMetrics {
        let div = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let precision = div(self.true_pos, self.true_pos + self.false_pos);
        let recall = div(self.true_pos, self.true_pos + self.false_neg);
        let f1 = div(
            2 * self.true_pos,
            2 * self.true_pos + self.false_pos + self.false_neg,
        );
        let f1_inactive = div(
            2 * self.true_neg,
            2 * self.true_neg + self.false_pos + self.false_neg,
        );
        let cells = self.true_pos + self.false_pos + self.false_neg + self.true_neg;
        SetMetrics {
            sets: self.sets,
            precision,
            recall,
            f1,
            exact_set_accuracy: div(self.exact, self.sets),
            recall_at_budget: div(self.hits_at_budget, self.true_total),
            elementwise_accuracy: div(self.true_pos + self.true_neg, cells),
            macro_f1: (f1 + f1_inactive) / 2.0,
        }
    }
}

/// The reported figures (see the module docs for definitions).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SetMetrics {
    /// (token, layer) pairs evaluated.
    pub sets: u64,
    pub precision: f64,
    pub recall: f64,
    /// Active-class F1 (the primary figure).
    pub f1: f64,
    pub exact_set_accuracy: f64,
    /// Recall of the true set within the top `B` of the ranking.
    pub recall_at_budget: f64,
    /// Element-wise accuracy over the token x layer x expert matrix.
    pub elementwise_accuracy: f64,
    /// Mean of active- and inactive-class F1 over that matrix (MoE-Beyond's "F1").
    pub macro_f1: f64,
}

/// Counts per target layer for one forecast group (one method, one horizon).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCounts {
    pub n_experts: usize,
    pub top_k: usize,
    pub budget: usize,
    pub layers: Vec<SetCounts>,
}

impl LayerCounts {
    /// Empty counts for `n_moe` layers.
    pub fn new(n_moe: usize, n_experts: usize, top_k: usize, budget: usize) -> Self {
        LayerCounts {
            n_experts,
            top_k,
            budget: budget.clamp(top_k, n_experts),
            layers: vec![SetCounts::default(); n_moe],
        }
    }

    /// Counts one prediction: `ranking` lists experts best first (at least `budget`
    /// long, no repeats); `truth` is the router's set.
    pub fn add(&mut self, layer: usize, ranking: &[u16], truth: &[u16]) {
        let k = self.top_k;
        let predicted = &ranking[..k.min(ranking.len())];
        let tp = predicted.iter().filter(|e| truth.contains(e)).count() as u64;
        let within = &ranking[..self.budget.min(ranking.len())];
        let hits = truth.iter().filter(|e| within.contains(e)).count() as u64;
        let (p, t) = (predicted.len() as u64, truth.len() as u64);
        let c = &mut self.layers[layer];
        c.sets += 1;
        c.true_pos += tp;
        c.false_pos += p - tp;
        c.false_neg += t - tp;
        c.true_neg += self.n_experts as u64 - (p + t - tp);
        c.exact += u64::from(tp == p && tp == t);
        c.hits_at_budget += hits;
        c.true_total += t;
    }

    /// Counts over all layers.
    pub fn total(&self) -> SetCounts {
        let mut all = SetCounts::default();
        for c in &self.layers {
            all.merge(c);
        }
        all
    }
}

/// Indices of the `n` largest scores, best first (ties: lower index first).
pub fn rank_top(scores: &[f32], n: usize, out: &mut Vec<u16>) {
    out.clear();
    out.extend(0..scores.len() as u16);
    let n = n.min(scores.len());
    let cmp = |a: &u16, b: &u16| {
        scores[*b as usize]
            .partial_cmp(&scores[*a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    if n < out.len() {
        out.select_nth_unstable_by(n, cmp);
        out.truncate(n);
    }
    out.sort_by(cmp);
}

/// Bins of predicted probability in a reliability curve.
pub const CALIBRATION_BINS: usize = 10;

/// One bin of a reliability curve: the (token, layer, expert) decisions whose predicted
/// probability fell in `[lo, hi)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    pub lo: f64,
    pub hi: f64,
    pub count: u64,
    /// Mean predicted probability of the bin's decisions.
    pub mean_prob: f64,
    /// Share of them whose expert was chosen.
    pub frequency: f64,
}

/// How well predicted probabilities match observed frequencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub bins: Vec<ReliabilityBin>,
    /// Expected calibration error: `sum_b (n_b / N) |frequency_b - mean_prob_b|`.
    pub ece: f64,
}

/// Running sums of a reliability curve.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CalibrationCounts {
    count: [u64; CALIBRATION_BINS],
    sum_p: [f64; CALIBRATION_BINS],
    chosen: [u64; CALIBRATION_BINS],
}

impl CalibrationCounts {
    /// Adds one (token, layer): `probs` of every expert, `truth` the chosen ones.
    pub fn add(&mut self, probs: &[f32], truth: &[u16]) {
        for (x, &p) in probs.iter().enumerate() {
            let b = ((p as f64 * CALIBRATION_BINS as f64) as usize).min(CALIBRATION_BINS - 1);
            self.count[b] += 1;
            self.sum_p[b] += p as f64;
            self.chosen[b] += truth.contains(&(x as u16)) as u64;
        }
    }

    /// The reliability curve (empty bins left out) and its expected calibration error.
    pub fn summary(&self) -> Calibration {
        let total = self.count.iter().sum::<u64>().max(1) as f64;
        let w = 1.0 / CALIBRATION_BINS as f64;
        let bins: Vec<ReliabilityBin> = (0..CALIBRATION_BINS)
            .filter(|&b| self.count[b] > 0)
            .map(|b| {
                let n = self.count[b] as f64;
                ReliabilityBin {
                    lo: b as f64 * w,
                    hi: (b + 1) as f64 * w,
                    count: self.count[b],
                    mean_prob: self.sum_p[b] / n,
                    frequency: self.chosen[b] as f64 / n,
                }
            })
            .collect();
        let ece = bins
            .iter()
            .map(|b| b.count as f64 / total * (b.frequency - b.mean_prob).abs())
            .sum();
        Calibration { bins, ece }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_bins_and_ece_follow_their_definitions() {
        let mut c = CalibrationCounts::default();
        // Two (token, layer) pairs of 4 experts: 0.95 for a chosen expert (bin 9); 0.15
        // for three unchosen experts and one chosen (bin 1); 0.55 for one chosen and one
        // unchosen (bin 5).
        c.add(&[0.95, 0.15, 0.15, 0.55], &[0, 3]);
        c.add(&[0.95, 0.15, 0.55, 0.15], &[0, 1]);
        let s = c.summary();
        let bin = |lo: f64| *s.bins.iter().find(|b| (b.lo - lo).abs() < 1e-9).unwrap();
        assert_eq!(s.bins.len(), 3);
        let (b1, b5, b9) = (bin(0.1), bin(0.5), bin(0.9));
        assert_eq!((b1.count, b5.count, b9.count), (4, 2, 2));
        assert!((b1.mean_prob - 0.15).abs() < 1e-6 && (b1.frequency - 0.25).abs() < 1e-12);
        assert_eq!((b5.frequency, b9.frequency), (0.5, 1.0));
        let want = (4.0 * 0.1 + 2.0 * 0.05 + 2.0 * 0.05) / 8.0;
        assert!((s.ece - want).abs() < 1e-6, "{} vs {want}", s.ece);
    }
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    /// The counts against a direct confusion matrix over the E yes/no decisions, and
    /// macro-F1 against its definition (mean of both classes' F1).
    #[test]
    fn counts_match_a_confusion_matrix() {
        let (e, k, budget) = (12usize, 3usize, 5usize);
        let mut rng = StdRng::seed_from_u64(0);
        let mut c = LayerCounts::new(2, e, k, budget);
        let (mut tp, mut fp, mut fn_, mut tn, mut exact, mut hits) = (0, 0, 0, 0, 0, 0);
        let sets = 200;
        for i in 0..sets {
            let mut all: Vec<u16> = (0..e as u16).collect();
            all.shuffle(&mut rng);
            let truth: Vec<u16> = all[..k].to_vec();
            let scores: Vec<f32> = (0..e).map(|_| rng.random::<f32>()).collect();
            let mut ranking = Vec::new();
            rank_top(&scores, budget, &mut ranking);
            let mut sorted: Vec<u16> = (0..e as u16).collect();
            sorted.sort_by(|a, b| scores[*b as usize].total_cmp(&scores[*a as usize]));
            assert_eq!(ranking, sorted[..budget]);
            for x in 0..e as u16 {
                let (p, t) = (sorted[..k].contains(&x), truth.contains(&x));
                match (p, t) {
                    (true, true) => tp += 1,
                    (true, false) => fp += 1,
                    (false, true) => fn_ += 1,
                    (false, false) => tn += 1,
                }
                hits += u64::from(t && sorted[..budget].contains(&x));
            }
            let mut a = sorted[..k].to_vec();
            a.sort();
            let mut b = truth.clone();
            b.sort();
            exact += u64::from(a == b);
            c.add(i % 2, &ranking, &truth);
        }
        let m = c.total().summary();
        let f = |a: f64, b: f64| 2.0 * a / (2.0 * a + b);
        let f1 = f(tp as f64, (fp + fn_) as f64);
        let f1_neg = f(tn as f64, (fp + fn_) as f64);
        assert!((m.f1 - f1).abs() < 1e-12);
        assert!((m.precision - tp as f64 / (tp + fp) as f64).abs() < 1e-12);
        assert!((m.macro_f1 - (f1 + f1_neg) / 2.0).abs() < 1e-12);
        assert!((m.elementwise_accuracy - (tp + tn) as f64 / (sets * e) as f64).abs() < 1e-12);
        assert!((m.exact_set_accuracy - exact as f64 / sets as f64).abs() < 1e-12);
        assert!((m.recall_at_budget - hits as f64 / (sets * k) as f64).abs() < 1e-12);
        assert_eq!(m.sets, sets as u64);
    }
}
