//! Comparing runs of the offloading engine (`moecast compare-runs`): `moecast run --json`
//! reports grouped by cache size and mode, each mode's mean decode tokens/s against the
//! best demand paging of its cache size and, where runs of the oracle prefetcher are
//! among them, the share of the gap to the fastest oracle it closes; with a plot
//! directory, one bar chart per cache size. Runs that alternated prefetch on and off
//! (`run --alternate-prefetch N`) are compared apart, by what they measured inside
//! themselves: how much longer steps without prefetch took than steps with it, and the
//! share of the oracle's in-run speedup a forecaster reaches (a disk's speed drifts
//! between runs by more than prefetch's effect; inside one run it moves both alike).
//! An in-run figure needs [`super::PairedEstimate::CONCLUSIVE_PAIRS`] windows without
//! prefetch.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use super::EngineReport;
use crate::OffloadError;

/// The runs of one mode at one cache size.
#[derive(Debug, Clone, PartialEq)]
pub struct ModeRuns {
    /// Resident experts.
    pub capacity: usize,
    /// Policy, prefetcher and budget, as the report names them.
    pub mode: String,
    /// A short name for a chart's axis: the policy on demand, else the prefetcher and
    /// its budget (`learned auto`, `oracle 3`).
    pub short: String,
    /// Decode tokens/s of each run.
    pub tokens_per_s: Vec<f64>,
    /// Each run's speedup from prefetch measured inside it (steps without it against
    /// the steps with it either side), where the run measured one.
    pub in_run: Vec<f64>,
    /// The runs alternated prefetch on and off (their tokens/s mixes both).
    pub alternated: bool,
    demand_paging: bool,
    oracle: bool,
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

impl ModeRuns {
    /// Mean decode tokens/s.
    pub fn mean(&self) -> f64 {
        mean(&self.tokens_per_s)
    }

    /// Mean in-run speedup from prefetch, if any run measured one.
    pub fn in_run_mean(&self) -> Option<f64> {
        (!self.in_run.is_empty()).then(|| mean(&self.in_run))
    }
}

/// Reads the reports `moecast run --json` wrote.
pub fn load_reports(paths: &[PathBuf]) -> Result<Vec<EngineReport>, OffloadError> {
    paths
        .iter()
        .map(|path| {
            let text =
                std::fs::read_to_string(path).map_err(|e| datasets::TraceError::io(path, e))?;
            let bad = |msg: String| OffloadError::Report {
                path: path.clone(),
                msg,
            };
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let report = value
                .get("report")
                .ok_or_else(|| bad("no \"report\" field".into()))?;
            let report: EngineReport =
                serde_json::from_value(report.clone()).map_err(|e| bad(e.to_string()))?;
            if report.decode_tokens == 0 || report.decode_s <= 0.0 {
                return Err(bad("it decoded no tokens".into()));
            }
            Ok(report)
        })
        .collect()
}

/// `r`'s mode in a few words: the policy on demand, else the prefetchers' words (their
/// names in reports written before the words) and the budget; the oracle's lead is its
/// budget, `planned` where the planner schedules it.
fn short_name(r: &EngineReport) -> String {
    if r.prefetch == "none" {
        return r.policy.clone();
    }
    let name = if r.prefetch_short.is_empty() {
        &r.prefetch
    } else {
        &r.prefetch_short
    };
    match (r.budget.as_str(), r.prefetch.starts_with("oracle")) {
        ("-", _) => name.clone(),
        ("auto", true) => format!("{name} planned"),
        (_, true) => name.clone(),
        (budget, false) => format!("{name} {budget}"),
    }
}

/// Groups `reports` by cache size and mode.
pub fn group_runs(reports: &[EngineReport]) -> Vec<ModeRuns> {
    let mut groups: Vec<ModeRuns> = Vec::new();
    for r in reports {
        let mode = if r.prefetch == "none" {
            format!("{}, on demand", r.policy)
        } else if r.budget == "-" {
            format!("{} + {}", r.policy, r.prefetch)
        } else {
            format!("{} + {}, budget {}", r.policy, r.prefetch, r.budget)
        };
        let tps = r.tokens_per_s();
        let in_run = r
            .paired_prefetch()
            .filter(|p| p.conclusive())
            .map(|p| p.mean);
        let alternated = r.alternate_window > 0;
        match groups
            .iter_mut()
            .find(|g| g.capacity == r.capacity && g.mode == mode && g.alternated == alternated)
        {
            Some(g) => {
                g.tokens_per_s.push(tps);
                g.in_run.extend(in_run);
            }
            None => groups.push(ModeRuns {
                capacity: r.capacity,
                short: short_name(r),
                demand_paging: r.prefetch == "none",
                oracle: r.prefetch.starts_with("oracle"),
                mode,
                tokens_per_s: vec![tps],
                in_run: in_run.into_iter().collect(),
                alternated,
            }),
        }
    }
    groups
}

/// `groups` by cache size (resident experts), in the order given.
fn by_capacity<'a>(
    groups: impl Iterator<Item = &'a ModeRuns>,
) -> BTreeMap<usize, Vec<&'a ModeRuns>> {
    let mut by_cache: BTreeMap<usize, Vec<&ModeRuns>> = BTreeMap::new();
    for g in groups {
        by_cache.entry(g.capacity).or_default().push(g);
    }
    by_cache
}

/// A bar chart at `path` of `value` per mode, labelled by short names unless two modes
/// would share one (then by their full names); its directory is created.
fn chart(
    path: &Path,
    title: &str,
    y_label: &str,
    modes: &[&ModeRuns],
    value: impl Fn(&ModeRuns) -> f64,
    reference: Option<(&str, f64)>,
) -> Result<PathBuf, OffloadError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| datasets::TraceError::io(dir, e))?;
    }
    let shorts: Vec<&str> = modes.iter().map(|g| g.short.as_str()).collect();
    let unique = (1..shorts.len()).all(|i| !shorts[..i].contains(&shorts[i]));
    let bars: Vec<(String, f64)> = modes
        .iter()
        .map(|g| {
            let name = if unique { &g.short } else { &g.mode };
            (name.clone(), value(g))
        })
        .collect();
    datasets::plot::bar_chart(path, title, "mode", y_label, &bars, reference)?;
    Ok(path.to_path_buf())
}

/// The comparison table of `paths` (reports of `moecast run --json`); with `plot_dir`,
/// a bar chart per cache size (`engine-cache-N.png`).
pub fn compare_runs(paths: &[PathBuf], plot_dir: Option<&Path>) -> Result<String, OffloadError> {
    let groups = group_runs(&load_reports(paths)?);
    let mut by_cache = by_capacity(groups.iter().filter(|g| !g.alternated));
    // Demand paging first, the oracles last.
    for modes in by_cache.values_mut() {
        modes.sort_by_key(|g| (!g.demand_paging, g.oracle, g.mode.clone()));
    }
    let mut out = String::new();
    for (capacity, modes) in &by_cache {
        let best = |pick: fn(&ModeRuns) -> bool| {
            modes
                .iter()
                .filter(|g| pick(g))
                .map(|g| g.mean())
                .max_by(f64::total_cmp)
        };
        let demand = best(|g| g.demand_paging);
        let oracle = best(|g| g.oracle);
        let _ = writeln!(
            out,
            "cache of {capacity} experts: mean decode tokens/s (runs), ratio to the best demand paging, gap to the fastest oracle closed; measured inside the runs (the guard's windows): steps without prefetch took Nx as long"
        );
        for g in modes {
            let ratio = demand.map_or("-".into(), |d| format!("{:.2}x", g.mean() / d));
            let closed = match (demand, oracle) {
                (Some(d), Some(o)) if o > d && !g.oracle => {
                    format!("{:.0}%", 100.0 * (g.mean() - d) / (o - d))
                }
                _ => "-".into(),
            };
            let in_run = g.in_run_mean().map_or("-".into(), |s| format!("{s:.2}x"));
            let _ = writeln!(
                out,
                "  {:<60} {:>7.2} ({})  {:>6}  {:>5}  {:>6}",
                g.mode,
                g.mean(),
                g.tokens_per_s.len(),
                ratio,
                closed,
                in_run
            );
        }
        if let Some(dir) = plot_dir {
            let path = chart(
                &dir.join(format!("engine-cache-{capacity}.png")),
                &format!("Offloading engine, cache of {capacity} experts"),
                "decode tokens/s (mean of runs)",
                modes,
                ModeRuns::mean,
                demand.map(|d| ("best demand paging", d)),
            )?;
            let _ = writeln!(out, "  plot: {}", path.display());
        }
    }
    out += &compare_in_run(&groups, plot_dir)?;
    Ok(out)
}

/// The table (and, with `plot_dir`, a chart per cache size) of the `groups` whose runs
/// alternated prefetch on and off: each mode's in-run speedup and its share of the
/// fastest oracle's.
fn compare_in_run(groups: &[ModeRuns], plot_dir: Option<&Path>) -> Result<String, OffloadError> {
    let mut by_cache = by_capacity(
        groups
            .iter()
            .filter(|g| g.alternated && !g.in_run.is_empty()),
    );
    let mut out = String::new();
    for (capacity, modes) in &mut by_cache {
        modes.sort_by_key(|g| (g.oracle, g.mode.clone()));
        let oracle = modes
            .iter()
            .filter(|g| g.oracle)
            .filter_map(|g| g.in_run_mean())
            .max_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "cache of {capacity} experts, prefetch alternated on and off inside each run: steps without it took Nx as long as with it (mean of runs; lowest-highest run), share of the fastest oracle's speedup reached"
        );
        for g in modes.iter() {
            let s = g.in_run_mean().unwrap_or(1.0);
            let lo = g.in_run.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = g.in_run.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let closed = match oracle {
                Some(o) if o > 1.0 && !g.oracle => format!("{:.0}%", 100.0 * (s - 1.0) / (o - 1.0)),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "  {:<60} {:>5.2}x ({:.2}-{:.2}, {} runs)  {:>5}",
                g.mode,
                s,
                lo,
                hi,
                g.in_run.len(),
                closed
            );
        }
        if let Some(dir) = plot_dir {
            let path = chart(
                &dir.join(format!("engine-cache-{capacity}-in-run.png")),
                &format!("Prefetch measured inside each run, cache of {capacity} experts"),
                "step time without prefetch / with it",
                modes,
                |g| g.in_run_mean().unwrap_or(1.0),
                Some(("no gain", 1.0)),
            )?;
            let _ = writeln!(out, "  plot: {}", path.display());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(
        capacity: usize,
        policy: &str,
        prefetch: &str,
        budget: &str,
        tps: f64,
    ) -> EngineReport {
        // the prefetchers' words as the engine writes them (report::prefetch_names)
        let short = match prefetch {
            "none" => "",
            "learned (next token)" => "learned",
            "token table" => "token",
            p if p.starts_with("oracle") => "oracle 3",
            p => p,
        };
        EngineReport {
            capacity,
            policy: policy.into(),
            prefetch: prefetch.into(),
            prefetch_short: short.into(),
            budget: budget.into(),
            decode_tokens: 100,
            decode_s: 100.0 / tps,
            ..EngineReport::default()
        }
    }

    fn write(dir: &Path, name: &str, r: &EngineReport) -> PathBuf {
        let path = dir.join(name);
        let json = serde_json::json!({ "report": r, "tokens_per_s": r.tokens_per_s() });
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    #[test]
    fn runs_are_averaged_per_mode_against_demand_paging_and_the_oracle() {
        let dir = tempfile::tempdir().unwrap();
        let oracle = "oracle (recorded experts, 3 ahead)";
        let runs = [
            ("a.json", report(10, "next-use", "none", "-", 10.0)),
            ("b.json", report(10, "next-use", "none", "-", 12.0)),
            ("c.json", report(10, "lru", "none", "-", 9.0)),
            (
                "d.json",
                report(10, "next-use", "learned (next token)", "auto", 14.0),
            ),
            ("e.json", report(10, "next-use", oracle, "-", 15.0)),
            ("f.json", report(10, "next-use", oracle, "-", 17.0)),
            ("g.json", report(24, "next-use", "none", "-", 20.0)),
            (
                "h.json",
                EngineReport {
                    prefetch_short: String::new(), // written before the short names
                    ..report(24, "next-use", "token table", "2", 21.0)
                },
            ),
        ];
        let paths: Vec<PathBuf> = runs.iter().map(|(n, r)| write(dir.path(), n, r)).collect();
        let plots = dir.path().join("plots");
        let table = compare_runs(&paths, Some(&plots)).unwrap();
        // Demand paging: next-use's mean 11 beats LRU's 9; the oracle's mean is 16, so
        // learned prefetch at 14 closes 3 of the 5 tokens/s.
        let line = |mode: &str| {
            table
                .lines()
                .find(|l| l.contains(mode))
                .unwrap()
                .to_string()
        };
        let learned = line("learned (next token), budget auto");
        assert!(
            learned.contains("14.00 (1)") && learned.contains("1.27x") && learned.contains("60%"),
            "{table}"
        );
        assert!(line("next-use, on demand").contains("11.00 (2)"), "{table}");
        assert!(line("lru, on demand").contains("0.82x"), "{table}");
        assert!(line("+ oracle").contains("16.00 (2)"), "{table}");
        // Demand paging comes first, the oracle last; one chart per cache size.
        let order: Vec<usize> = ["lru, on demand", "+ learned", "+ oracle"]
            .iter()
            .map(|m| table.find(m).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{table}");
        for c in [10, 24] {
            assert!(plots.join(format!("engine-cache-{c}.png")).is_file());
        }
        let groups = group_runs(&load_reports(&paths).unwrap());
        let shorts: Vec<&str> = groups.iter().map(|g| g.short.as_str()).collect();
        assert_eq!(
            shorts,
            [
                "next-use",
                "lru",
                "learned auto",
                "oracle 3",
                "next-use",
                "token table 2"
            ]
        );
    }

    #[test]
    fn alternated_runs_are_compared_by_what_they_measured_inside_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let oracle = "oracle (recorded experts, 3 ahead)";
        // Steps without prefetch 15% (learned) and 30% (oracle) longer than with it,
        // whatever the disk's speed in each run.
        let alternated = |prefetch: &str, budget: &str, off: f64, slow: f64| {
            let mut r = report(10, "next-use", prefetch, budget, 5.0 / slow);
            r.alternate_window = 8;
            r.prefetch_windows = [(true, 0.1 * slow), (false, off * slow)]
                .repeat(3)
                .into_iter()
                .chain([(true, 0.1 * slow)])
                .collect();
            r
        };
        let mut guarded = report(10, "next-use", "learned (next token)", "auto", 9.0);
        guarded.prefetch_windows = [(true, 0.1), (false, 0.12)]
            .repeat(3)
            .into_iter()
            .chain([(true, 0.1)])
            .collect();
        // One window without prefetch is too few for a figure.
        let mut one_window = report(10, "next-use", "token table", "auto", 9.0);
        one_window.prefetch_windows = vec![(true, 0.1), (false, 0.12), (true, 0.1)];
        let runs = [
            ("a.json", report(10, "next-use", "none", "-", 8.0)),
            ("b.json", guarded),
            ("f.json", one_window),
            (
                "c.json",
                alternated("learned (next token)", "auto", 0.115, 1.0),
            ),
            (
                "d.json",
                alternated("learned (next token)", "auto", 0.115, 2.0),
            ),
            ("e.json", alternated(oracle, "-", 0.13, 1.5)),
        ];
        let paths: Vec<PathBuf> = runs.iter().map(|(n, r)| write(dir.path(), n, r)).collect();
        let plots = dir.path().join("plots");
        let table = compare_runs(&paths, Some(&plots)).unwrap();
        let (unpaired, in_run) = table.split_once("alternated on and off").unwrap();
        // The guarded run stays in the first table with its 3 windows' 1.20x; the
        // alternated runs' tokens/s mix both settings and are not compared there.
        let guarded = unpaired.lines().find(|l| l.contains("+ learned")).unwrap();
        assert!(
            guarded.contains("9.00 (1)") && guarded.trim_end().ends_with("1.20x"),
            "{table}"
        );
        let token = unpaired.lines().find(|l| l.contains("+ token")).unwrap();
        assert!(token.trim_end().ends_with('-'), "{table}");
        assert!(!unpaired.contains("+ oracle"), "{table}");
        let learned = in_run.lines().find(|l| l.contains("+ learned")).unwrap();
        assert!(
            learned.contains("1.15x (1.15-1.15, 2 runs)") && learned.trim_end().ends_with("50%"),
            "{table}"
        );
        assert!(in_run.contains("1.30x (1.30-1.30, 1 runs)"), "{table}");
        assert!(plots.join("engine-cache-10-in-run.png").is_file());
    }

    #[test]
    fn a_file_that_is_not_a_run_report_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let good = write(
            dir.path(),
            "good.json",
            &report(10, "lru", "none", "-", 5.0),
        );
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"tokens_per_s": 3}"#).unwrap();
        let err = compare_runs(&[good.clone(), bad], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.json") && err.contains("no \"report\""),
            "{err}"
        );
        let empty = write(
            dir.path(),
            "empty.json",
            &report(10, "lru", "none", "-", 5.0),
        );
        let mut r = report(10, "lru", "none", "-", 5.0);
        r.decode_tokens = 0;
        let zero = write(dir.path(), "zero.json", &r);
        let err = compare_runs(&[empty, zero], None).unwrap_err().to_string();
        assert!(
            err.contains("zero.json") && err.contains("no tokens"),
            "{err}"
        );
        let missing = dir.path().join("missing.json");
        let err = compare_runs(&[good, missing], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }
}
