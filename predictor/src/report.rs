//! An [`EvalReport`] for people: the text tables `moecast eval` prints and the
//! F1-per-layer charts.

use std::path::{Path, PathBuf};

use crate::error::{PredictorError, Result};
use crate::eval::{EvalReport, MethodReport};

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
