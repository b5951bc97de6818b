//! Prefetch measured inside one run. Runs of one replay a minute apart see this disk at
//! speeds that differ by more than prefetch's effect, so a mode's tokens/s against
//! demand paging's separate run can say prefetch slowed decoding when every step it ran
//! was faster. [`AlternatingPrefetch`] runs prefetch on and off in alternate windows of
//! decode steps within one run; [`PairedEstimate`] compares each window without it with
//! the windows with it on either side (a drift moves both sides alike), from these
//! windows or the [`super::PrefetchGuard`]'s.

use serde::{Deserialize, Serialize};

use super::PrefetchGuard;

/// Prefetch on and off in alternate windows of decode steps. The first window (on)
/// warms the cache and is not measured; the first step after each switch is not
/// measured either (it reaps, or misses, the other setting's reads).
#[derive(Debug, Clone)]
pub struct AlternatingPrefetch {
    window: usize,
    on: bool,
    steps: usize,
    sum_s: f64,
    skip: bool,
    warm: bool,
    /// Decode steps run with prefetch off.
    pub steps_off: u64,
}

impl AlternatingPrefetch {
    /// The shortest window: its first step after a switch is not measured.
    pub const MIN_WINDOW: usize = 2;

    /// Windows of `window` decode steps (at least [`Self::MIN_WINDOW`]).
    pub fn new(window: usize) -> AlternatingPrefetch {
        AlternatingPrefetch {
            window: window.max(Self::MIN_WINDOW),
            on: true,
            steps: 0,
            sum_s: 0.0,
            skip: false,
            warm: false,
            steps_off: 0,
        }
    }

    /// Whether prefetch runs in this decode step.
    pub fn enabled(&self) -> bool {
        self.on
    }

    /// A decode step took `seconds`; when it ends a measured window, that window:
    /// whether prefetch ran, its mean step time (seconds).
    pub fn step_done(&mut self, seconds: f64) -> Option<(bool, f64)> {
        if !self.on {
            self.steps_off += 1;
        }
        self.steps += 1;
        if !std::mem::take(&mut self.skip) {
            self.sum_s += seconds;
        }
        if self.steps < self.window {
            return None;
        }
        let measured = if self.warm {
            self.window - 1
        } else {
            self.window
        };
        let window = (self.on, self.sum_s / measured as f64);
        self.steps = 0;
        self.sum_s = 0.0;
        self.skip = true;
        if !self.warm {
            // The cold cache's window runs with prefetch and is followed by another.
            self.warm = true;
            return None;
        }
        self.on = !self.on;
        Some(window)
    }
}

/// What decides, step by step, whether prefetch runs: the guard (keeps the faster
/// setting) or the alternation (measures both).
#[derive(Debug, Clone)]
pub enum PrefetchSwitch {
    Guard(PrefetchGuard),
    Alternate(AlternatingPrefetch),
}

impl PrefetchSwitch {
    /// Whether prefetch runs in this decode step.
    pub fn enabled(&self) -> bool {
        match self {
            PrefetchSwitch::Guard(g) => g.enabled(),
            PrefetchSwitch::Alternate(a) => a.enabled(),
        }
    }

    /// A decode step took `seconds`; the window it ended, if measured.
    pub fn step_done(&mut self, seconds: f64) -> Option<(bool, f64)> {
        match self {
            PrefetchSwitch::Guard(g) => g.step_done(seconds),
            PrefetchSwitch::Alternate(a) => a.step_done(seconds),
        }
    }

    /// Decode steps run without prefetch so far.
    pub fn steps_off(&self) -> u64 {
        match self {
            PrefetchSwitch::Guard(g) => g.steps_off,
            PrefetchSwitch::Alternate(a) => a.steps_off,
        }
    }
}

/// How much longer decode steps without prefetch took than steps with it, in one run:
/// each measured window without prefetch against the mean of the windows with it just
/// before and after it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedEstimate {
    /// Windows without prefetch with a window with it on either side.
    pub pairs: usize,
    /// Mean, lowest and highest ratio of their step time to their neighbours' (above 1:
    /// prefetch shortened the steps; the speedup prefetch gave).
    pub mean: f64,
    pub lowest: f64,
    pub highest: f64,
}

impl PairedEstimate {
    /// Windows without prefetch an estimate needs before it is printed or tabled as a
    /// figure: one window's ratio moves by 20-40% with the disk.
    pub const CONCLUSIVE_PAIRS: usize = 3;

    /// Whether it rests on [`Self::CONCLUSIVE_PAIRS`] windows or more.
    pub fn conclusive(&self) -> bool {
        self.pairs >= Self::CONCLUSIVE_PAIRS
    }

    /// From consecutive measured windows (prefetch on, mean step time); `None` without
    /// a window off between two on.
    pub fn from_windows(windows: &[(bool, f64)]) -> Option<PairedEstimate> {
        let ratios: Vec<f64> = windows
            .windows(3)
            .filter(|w| w[0].0 && !w[1].0 && w[2].0)
            .map(|w| w[1].1 / ((w[0].1 + w[2].1) / 2.0))
            .filter(|r| r.is_finite())
            .collect();
        if ratios.is_empty() {
            return None;
        }
        Some(PairedEstimate {
            pairs: ratios.len(),
            mean: ratios.iter().sum::<f64>() / ratios.len() as f64,
            lowest: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            highest: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `steps` decode steps whose time is `time(step, prefetch on)`; the windows.
    fn run(
        a: &mut AlternatingPrefetch,
        steps: usize,
        time: impl Fn(usize, bool) -> f64,
    ) -> Vec<(bool, f64)> {
        (0..steps)
            .filter_map(|t| {
                let on = a.enabled();
                a.step_done(time(t, on))
            })
            .collect()
    }

    #[test]
    fn windows_alternate_after_the_warm_one_and_skip_the_step_after_a_switch() {
        let mut a = AlternatingPrefetch::new(4);
        let mut last = true;
        let mut settings = Vec::new();
        let windows: Vec<(bool, f64)> = (0..4 * 7)
            .filter_map(|_| {
                let on = a.enabled();
                settings.push(on);
                // The step after a switch is very fast: not measured, it changes nothing.
                let t = if on != last {
                    0.001
                } else if on {
                    0.08
                } else {
                    0.1
                };
                last = on;
                a.step_done(t)
            })
            .collect();
        // Warm (on), then on, off, on, off, on, off.
        assert_eq!(
            settings.iter().filter(|&&s| !s).count(),
            3 * 4,
            "{settings:?}"
        );
        assert!(settings[..8].iter().all(|&s| s), "{settings:?}");
        let expected = [(true, 0.08), (false, 0.1), (true, 0.08), (false, 0.1)];
        for (w, e) in windows.iter().zip(&expected) {
            assert_eq!(w.0, e.0);
            assert!((w.1 - e.1).abs() < 1e-12, "{windows:?}");
        }
        assert_eq!(windows.len(), 6);
        assert_eq!(a.steps_off, 12);
        let est = PairedEstimate::from_windows(&windows).unwrap();
        assert_eq!(est.pairs, 2);
        assert!((est.mean - 1.25).abs() < 1e-9, "{est:?}");
    }

    #[test]
    fn a_drifting_disk_does_not_move_the_paired_estimate() {
        // Every step gets slower (the disk halves its speed over the run), prefetch keeps
        // steps 15% shorter: each pair sees it, although the run's last windows with
        // prefetch are slower than its first windows without.
        let mut a = AlternatingPrefetch::new(8);
        let windows = run(&mut a, 400, |t, on| {
            (0.10 + 0.10 * t as f64 / 400.0) * if on { 0.85 } else { 1.0 }
        });
        let est = PairedEstimate::from_windows(&windows).unwrap();
        assert!(est.pairs >= 20, "{est:?}");
        assert!((est.mean - 1.0 / 0.85).abs() < 0.01, "{est:?}");
        assert!(est.lowest > 1.1 && est.highest < 1.25, "{est:?}");
        // Prefetch that slows the steps reads below 1.
        let mut a = AlternatingPrefetch::new(8);
        let windows = run(&mut a, 200, |_, on| if on { 0.12 } else { 0.10 });
        let est = PairedEstimate::from_windows(&windows).unwrap();
        assert!((est.mean - 0.1 / 0.12).abs() < 1e-9, "{est:?}");
    }

    #[test]
    fn only_windows_without_prefetch_between_two_with_it_are_paired() {
        assert_eq!(PairedEstimate::from_windows(&[]), None);
        let all_on = [(true, 0.1), (true, 0.1), (true, 0.1)];
        assert_eq!(PairedEstimate::from_windows(&all_on), None);
        // The guard's windows: off at the end has no later neighbour; off twice running
        // (prefetch switched off) pairs neither.
        let guard = [
            (true, 0.10),
            (false, 0.12),
            (true, 0.08),
            (true, 0.08),
            (false, 0.09),
            (false, 0.09),
            (true, 0.10),
            (false, 0.2),
        ];
        let est = PairedEstimate::from_windows(&guard).unwrap();
        assert_eq!(est.pairs, 1);
        assert!((est.mean - 0.12 / 0.09).abs() < 1e-9, "{est:?}");
    }
}
