//! What `moecast eval` reports ([`EvalReport`]: every method's figures per forecast
//! group), and the same for people: the text tables it prints and the F1-per-layer charts.

use std::path::{Path, PathBuf};

use datasets::examples::Split;
use serde::{Deserialize, Serialize};

use crate::config::Task;
use crate::error::{PredictorError, Result};
use crate::metrics::{Calibration, SetMetrics};

/// A method's figures for one forecast group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupReport {
    /// Overall figures (micro over tokens x target layers).
    pub overall: SetMetrics,
    /// Reliability of the predicted probabilities (the predictor only; baselines rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    /// Per target MoE layer (`None` where the group has no target at that layer).
    pub per_layer: Vec<Option<SetMetrics>>,
}

/// One method (the predictor or a baseline) over all groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodReport {
    pub method: String,
    /// Parallel to [`EvalReport::groups`].
    pub groups: Vec<GroupReport>,
}

/// Everything `moecast eval` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub task: Task,
    /// Forecast groups: `next token`, or `+1`, `+2`, ... layers ahead.
    pub groups: Vec<String>,
    /// Prefetch budget `B` of `recall_at_budget`, experts per layer.
    pub budget: usize,
    pub top_k: usize,
    pub n_experts: usize,
    /// Traces and split evaluated.
    pub traces: Vec<PathBuf>,
    pub split: Split,
    pub sequences: usize,
    pub tokens: usize,
    pub methods: Vec<MethodReport>,
}

impl EvalReport {
    /// The report of `method`, if present.
    pub fn method(&self, method: &str) -> Option<&MethodReport> {
        self.methods.iter().find(|m| m.method == method)
    }

    /// The forecast groups where `baseline` scores a higher F1 than the predictor (the
    /// first method): `(group, baseline F1, predictor F1)`, groups it was scored on only.
    /// The predictor's F1 is taken over the layers the baseline was scored on (a
    /// first-layer forecast is compared with the predictor's first layer); with sets of
    /// `k` on both sides that is the set-weighted mean of the per-layer F1.
    pub fn groups_lost_to(&self, baseline: &str) -> Vec<(String, f64, f64)> {
        let (Some(pred), Some(base)) = (self.methods.first(), self.method(baseline)) else {
            return Vec::new();
        };
        self.groups
            .iter()
            .zip(pred.groups.iter().zip(&base.groups))
            .filter(|(_, (_, b))| b.overall.sets > 0)
            .map(|(g, (p, b))| (g.clone(), b.overall.f1, f1_on_layers_of(p, b)))
            .filter(|(_, theirs, ours)| theirs > ours)
            .collect()
    }

    /// Every (baseline, group) where a baseline scores a higher F1 than the predictor:
    /// `(baseline, group, baseline F1, predictor F1)`.
    pub fn baseline_wins(&self) -> Vec<(String, String, f64, f64)> {
        self.methods
            .iter()
            .skip(1)
            .flat_map(|m| {
                self.groups_lost_to(&m.method)
                    .into_iter()
                    .map(|(g, b, p)| (m.method.clone(), g, b, p))
            })
            .collect()
    }
}

/// The F1 of `ours` over the layers `theirs` was scored on (all of `ours` when the
/// coverage is the same).
fn f1_on_layers_of(ours: &GroupReport, theirs: &GroupReport) -> f64 {
    let covered =
        |g: &GroupReport| -> Vec<bool> { g.per_layer.iter().map(|x| x.is_some()).collect() };
    if covered(ours) == covered(theirs) {
        return ours.overall.f1;
    }
    let (mut num, mut den) = (0.0, 0.0);
    for (o, t) in ours.per_layer.iter().zip(&theirs.per_layer) {
        if let (Some(o), Some(_)) = (o, t) {
            num += o.f1 * o.sets as f64;
            den += o.sets as f64;
        }
    }
    if den == 0.0 {
        ours.overall.f1
    } else {
        num / den
    }
}

/// The report as text: one table of overall figures per group, then F1 per layer.
pub fn render_table(r: &EvalReport) -> String {
    let mut s = String::new();
    for (gi, g) in r.groups.iter().enumerate() {
        s += &format!(
            "{} ({}, top-{} of {}, {} sequences, {} tokens)\n",
            g,
            r.task.as_str(),
            r.top_k,
            r.n_experts,
            r.sequences,
            r.tokens
        );
        let shown: Vec<&MethodReport> = r
            .methods
            .iter()
            .filter(|mr| mr.groups[gi].overall.sets > 0)
            .collect();
        let w = shown
            .iter()
            .map(|mr| mr.method.len())
            .max()
            .unwrap_or(0)
            .max(18);
        s += &format!(
            "  {:<w$} {:>7} {:>9} {:>7} {:>7} {:>9} {:>9} {:>9}\n",
            "method",
            "F1",
            "precision",
            "recall",
            "exact",
            format!("recall@{}", r.budget),
            "elem-acc",
            "macro-F1"
        );
        for mr in &shown {
            let o = &mr.groups[gi].overall;
            s += &format!(
                "  {:<w$} {:>7.4} {:>9.4} {:>7.4} {:>7.4} {:>9.4} {:>9.4} {:>9.4}\n",
                mr.method,
                o.f1,
                o.precision,
                o.recall,
                o.exact_set_accuracy,
                o.recall_at_budget,
                o.elementwise_accuracy,
                o.macro_f1
            );
        }
        s += &format!("  F1 per layer ({g}):\n  {:<6}", "layer");
        for mr in &shown {
            s += &format!(" {:>w$}", mr.method);
        }
        s += "\n";
        let n_layers = r.methods[0].groups[gi].per_layer.len();
        for l in 0..n_layers {
            if r.methods[0].groups[gi].per_layer[l].is_none() {
                continue;
            }
            s += &format!("  {l:<6}");
            for mr in &shown {
                let f = mr.groups[gi].per_layer[l].map_or("-".into(), |x| format!("{:.4}", x.f1));
                s += &format!(" {f:>w$}");
            }
            s += "\n";
        }
        if let Some(c) = &r.methods[0].groups[gi].calibration {
            s += &format!(
                "  calibration of the predictor's probabilities ({g}): expected calibration error {:.4}\n  {:<12} {:>10} {:>9} {:>9}\n",
                c.ece, "probability", "decisions", "mean p", "observed"
            );
            for b in &c.bins {
                s += &format!(
                    "  [{:.1}, {:.1})   {:>10} {:>9.4} {:>9.4}\n",
                    b.lo, b.hi, b.count, b.mean_prob, b.frequency
                );
            }
        }
        s += "\n";
    }
    s
}

/// Writes one PNG per group (F1 per target layer for every method) and the reliability
/// curve of the predictor's probabilities. Returns the files.
pub fn plot_f1(r: &EvalReport, dir: &Path) -> Result<Vec<PathBuf>> {
    use datasets::plot::{line_chart, Series};
    std::fs::create_dir_all(dir).map_err(|e| PredictorError::io(dir, e))?;
    let mut files = Vec::new();
    for (gi, g) in r.groups.iter().enumerate() {
        let series_data: Vec<(String, Vec<(f64, f64)>)> = r
            .methods
            .iter()
            .filter(|mr| mr.groups[gi].overall.sets > 0)
            .map(|mr| {
                let pts = mr.groups[gi]
                    .per_layer
                    .iter()
                    .enumerate()
                    .filter_map(|(l, x)| x.map(|x| (l as f64, x.f1)))
                    .collect();
                (mr.method.clone(), pts)
            })
            .collect();
        let series: Vec<Series<'_>> = series_data
            .iter()
            .map(|(name, pts)| Series {
                name,
                points: pts.clone(),
            })
            .collect();
        let slug: String = g
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("f1_per_layer_{}_{}.png", r.task.as_str(), slug));
        line_chart(
            &path,
            &format!("Top-{} F1 per MoE layer ({g})", r.top_k),
            "MoE layer",
            "F1",
            &series,
            None,
        )?;
        files.push(path);
    }
    let curves: Vec<(String, Vec<(f64, f64)>)> = r
        .groups
        .iter()
        .zip(&r.methods[0].groups)
        .filter_map(|(g, gr)| {
            let c = gr.calibration.as_ref()?;
            let pts = c.bins.iter().map(|b| (b.mean_prob, b.frequency)).collect();
            Some((format!("{g} (ECE {:.3})", c.ece), pts))
        })
        .collect();
    if !curves.is_empty() {
        let mut series: Vec<Series<'_>> = curves
            .iter()
            .map(|(name, pts)| Series {
                name,
                points: pts.clone(),
            })
            .collect();
        series.push(Series {
            name: "perfectly calibrated",
            points: vec![(0.0, 0.0), (1.0, 1.0)],
        });
        let path = dir.join(format!("reliability_{}.png", r.task.as_str()));
        line_chart(
            &path,
            "Reliability of the predictor's probabilities",
            "predicted probability",
            "observed frequency",
            &series,
            None,
        )?;
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(sets: u64, f1: f64) -> GroupReport {
        let m = SetMetrics {
            sets,
            precision: f1,
            recall: f1,
            f1,
            exact_set_accuracy: 0.0,
            recall_at_budget: f1,
            elementwise_accuracy: 0.0,
            macro_f1: 0.0,
        };
        GroupReport {
            calibration: None,
            overall: m,
            per_layer: vec![Some(m)],
        }
    }

    #[test]
    fn a_baseline_wins_only_the_groups_it_scores_higher_on() {
        let method = |name: &str, groups: Vec<GroupReport>| MethodReport {
            method: name.into(),
            groups,
        };
        let report = EvalReport {
            task: Task::Lookahead,
            groups: vec!["next token".into(), "+1 layer".into(), "+2 layers".into()],
            budget: 4,
            top_k: 2,
            n_experts: 16,
            traces: Vec::new(),
            split: Split::Test,
            sequences: 1,
            tokens: 10,
            methods: vec![
                method(
                    "predictor",
                    vec![group(10, 0.5), group(10, 0.8), group(10, 0.7)],
                ),
                method(
                    "cross-layer gate",
                    vec![group(0, 0.9), group(10, 0.8), group(10, 0.75)],
                ),
            ],
        };
        assert_eq!(
            report.groups_lost_to("cross-layer gate"),
            vec![("+2 layers".to_string(), 0.75, 0.7)]
        );
        assert!(report.groups_lost_to("pre-attention gate").is_empty());
    }
}
