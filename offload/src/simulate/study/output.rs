//! What a finished [`Study`] prints, writes as JSON and plots.

use std::path::{Path, PathBuf};

use super::{Study, StudyError, StudyRow};

impl Study {
    /// The header lines and the policy table, as `moecast simulate` prints them.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        if s.parts.len() > 1 {
            out += &format!(
                "{} parts, each replayed from a cold cache (sums below)\n",
                s.parts.len()
            );
        }
        out += &format!(
            "{} tokens, {} MoE layers x {} experts (top-{}); expert {:.0} bytes over {} GB/s = {:.1} us, compute {} us/layer{}{}\n",
            self.tokens, self.n_moe, self.n_experts, self.top_k, self.expert_bytes, s.bandwidth,
            self.expert_bytes / (s.bandwidth * 1e3), s.compute_us_per_layer,
            if s.attention_us_per_layer > 0.0 { format!(" after {} us of attention", s.attention_us_per_layer) } else { String::new() },
            if s.deadline_order { "" } else { ", sent in the order issued" }
        );
        out += &format!(
            "budget N: the best N experts of every forecast layer at every event; auto: planned against the link (from {} candidates per layer, {:.0}-byte chunks, losers cancelled); untimed: every candidate read instantly; forecasts read up to {} layers ahead, the oracle at its fastest lead up to that (per part)\n",
            self.candidates, s.chunk_bytes, s.horizon
        );
        let w = self
            .rows
            .iter()
            .map(|r| r.timed.prefetch.len())
            .max()
            .unwrap_or(0)
            .max(13);
        out += &format!(
            "{:>8} {:>7} {:<w$} {:>6} {:>8} {:>8} {:>9} {:>10} {:>9} {:>9} {:>12}\n",
            "cache",
            "policy",
            "prefetch",
            "budget",
            "hit",
            "late",
            "stall/tok",
            "tokens/s",
            "MB moved",
            "useful",
            "untimed hit"
        );
        for StudyRow {
            cache,
            timed: r,
            untimed: u,
        } in &self.rows
        {
            out += &format!(
                "{:>8} {:>7} {:<w$} {:>6} {:>7.1}% {:>7.1}% {:>7.1}us {:>10.0} {:>9.1} {:>8.1}% {:>11.1}%\n",
                format!("{cache}={}", r.capacity),
                r.policy,
                r.prefetch,
                r.budget,
                100.0 * r.hit_rate(),
                100.0 * r.late as f64 / r.accesses.max(1) as f64,
                r.stall_us_per_token(),
                r.tokens_per_s(),
                (r.bytes_demand + r.bytes_prefetch) / 1e6,
                100.0 * r.useful_prefetches as f64 / r.prefetches.max(1) as f64,
                100.0 * u.hit_rate()
            );
        }
        out
    }

    /// Every row with the settings, as `--json` writes it.
    pub fn to_json(&self) -> serde_json::Value {
        let s = &self.settings;
        let settings = serde_json::json!({
            "bandwidth_gbps": s.bandwidth, "expert_bytes": self.expert_bytes,
            "compute_us_per_layer": s.compute_us_per_layer,
            "attention_us_per_layer": s.attention_us_per_layer,
            "link_order": if s.deadline_order { "deadline" } else { "issue" },
            "budgets": s.budget, "chunk_bytes": s.chunk_bytes, "candidates_per_layer": self.candidates,
            "horizon": s.horizon, "per_layer_cache": s.per_layer,
        });
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|StudyRow { cache, timed: r, untimed: u }| {
                serde_json::json!({
                    "cache": cache, "settings": settings, "timed": r, "untimed": u,
                    "hit_rate": r.hit_rate(), "untimed_hit_rate": u.hit_rate(),
                    "tokens_per_s": r.tokens_per_s(), "stall_us_per_token": r.stall_us_per_token(),
                })
            })
            .collect();
        serde_json::Value::Array(rows)
    }

    /// Writes `hit_rate_vs_cache.png` (hit rate against cache size, one line per policy,
    /// prefetcher and budget) into `dir`; returns its path.
    pub fn plot(&self, dir: &Path) -> Result<PathBuf, StudyError> {
        std::fs::create_dir_all(dir).map_err(|e| datasets::TraceError::io(dir, e))?;
        let total = (self.n_moe * self.n_experts) as f64;
        let mut series_data: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for StudyRow { timed: r, .. } in &self.rows {
            let name = match r.budget.as_str() {
                "-" => format!("{} + {}", r.policy, r.prefetch),
                b => format!("{} + {} ({b})", r.policy, r.prefetch),
            };
            let point = (100.0 * r.capacity as f64 / total, 100.0 * r.hit_rate());
            match series_data.iter_mut().find(|(n, _)| *n == name) {
                Some((_, pts)) => pts.push(point),
                None => series_data.push((name, vec![point])),
            }
        }
        let series: Vec<datasets::plot::Series<'_>> = series_data
            .iter()
            .map(|(n, p)| datasets::plot::Series {
                name: n,
                points: p.clone(),
            })
            .collect();
        let path = dir.join("hit_rate_vs_cache.png");
        datasets::plot::line_chart(
            &path,
            "Expert-cache hit rate (timing-honest)",
            "cache size (% of all experts)",
            "hit rate (%)",
            &series,
            None,
        )?;
        Ok(path)
    }
}
