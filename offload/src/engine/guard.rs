//! [`PrefetchGuard`]: planned prefetch must pay on the machine it runs on. The planner's
//! model of the link leaves out costs it cannot see (loading an expert also takes CPU
//! time from the compute on a small machine, reads share the device's queue), so the
//! engine measures: decode steps run in windows, planned prefetch on or off per window,
//! each setting's mean step time is kept, and the faster one runs, the other measured
//! again now and then — after `explore_every` windows, twice as long each time it loses
//! again (up to [`MAX_EXPLORE_INTERVAL`]), back to `explore_every` when it wins
//! (ExpertFlow's lesson: prefetch adds no bandwidth, so it stops where it does not
//! shorten the steps).

/// Chooses, window by window, whether planned prefetch runs.
#[derive(Debug, Clone)]
pub struct PrefetchGuard {
    window: usize,
    explore_every: usize,
    /// Windows until the setting not in use is measured again, and the window it is.
    interval: usize,
    next_explore: usize,
    exploring: bool,
    on: bool,
    steps: usize,
    sum_s: f64,
    /// Mean step time with prefetch off and on (an exponential mean over windows).
    mean_s: [Option<f64>; 2],
    windows: usize,
    /// Whether the first window, which warms the cache (its steps miss whatever the
    /// setting) and is not measured, is done.
    warm: bool,
    /// Decode steps run with prefetch off.
    pub steps_off: u64,
}

/// Weight of the newest window in each setting's mean.
const RATE: f64 = 0.5;
/// Longest wait, in windows, before the setting not in use is measured again.
pub const MAX_EXPLORE_INTERVAL: usize = 32;
/// Prefetch (the configured setting) stays on unless steps without it are faster by
/// more than this share: step times of a few milliseconds differ by that much between
/// windows on their own.
pub const MARGIN: f64 = 0.02;

impl PrefetchGuard {
    /// Windows of `window` decode steps; the setting not in use is measured again after
    /// `explore_every` windows at first. The first window runs with prefetch and only
    /// warms the cache (counted, it made prefetch look slow: the next window, without
    /// prefetch, found the experts it had read); the second, measured, with prefetch,
    /// the third without.
    pub fn new(window: usize, explore_every: usize) -> PrefetchGuard {
        let explore_every = explore_every.max(2);
        PrefetchGuard {
            window: window.max(1),
            explore_every,
            interval: explore_every,
            next_explore: 2 + explore_every,
            exploring: false,
            on: true,
            steps: 0,
            sum_s: 0.0,
            mean_s: [None, None],
            windows: 0,
            warm: false,
            steps_off: 0,
        }
    }

    /// Whether planned prefetch runs in this decode step.
    pub fn enabled(&self) -> bool {
        self.on
    }

    /// A decode step took `seconds`.
    pub fn step_done(&mut self, seconds: f64) {
        if !self.on {
            self.steps_off += 1;
        }
        self.steps += 1;
        self.sum_s += seconds;
        if self.steps < self.window {
            return;
        }
        let mean = self.sum_s / self.steps as f64;
        self.steps = 0;
        self.sum_s = 0.0;
        if !self.warm {
            self.warm = true;
            return;
        }
        let arm = &mut self.mean_s[self.on as usize];
        *arm = Some(arm.map_or(mean, |m| m + RATE * (mean - m)));
        self.windows += 1;
        self.on = match self.mean_s {
            [None, _] => false,
            [_, None] => true,
            [Some(off), Some(on)] => {
                let best = on < off * (1.0 + MARGIN);
                if self.exploring {
                    // The explored setting lost again: wait longer before the next try.
                    self.interval = if best != self.on {
                        (2 * self.interval).min(MAX_EXPLORE_INTERVAL)
                    } else {
                        self.explore_every
                    };
                    self.next_explore = self.windows + self.interval;
                }
                self.exploring = self.windows >= self.next_explore;
                if self.exploring {
                    !best
                } else {
                    best
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::PrefetchGuard;

    /// Runs `steps` decode steps whose time depends on the setting.
    fn run(g: &mut PrefetchGuard, steps: usize, on_s: f64, off_s: f64) -> usize {
        let mut on_steps = 0;
        for _ in 0..steps {
            on_steps += g.enabled() as usize;
            g.step_done(if g.enabled() { on_s } else { off_s });
        }
        on_steps
    }

    #[test]
    fn prefetch_that_slows_the_steps_is_turned_off_and_kept_measured() {
        let mut g = PrefetchGuard::new(8, 6);
        let on = run(&mut g, 480, 0.12, 0.10);
        // Warmed and measured once each, then off except the ever rarer windows that
        // measure it.
        assert!(on <= 16 + 8 * 4, "{on}");
        assert!(on >= 16 + 8, "the slower setting is measured again: {on}");
        assert_eq!(g.steps_off as usize, 480 - on);
    }

    #[test]
    fn prefetch_within_the_margin_of_none_stays_on() {
        let mut g = PrefetchGuard::new(8, 6);
        let on = run(&mut g, 480, 0.101, 0.100);
        assert!(on >= 480 - 8 - 480 / 6 - 8, "{on}");
    }

    #[test]
    fn prefetch_that_pays_stays_on_and_a_change_is_followed() {
        let mut g = PrefetchGuard::new(8, 6);
        let on = run(&mut g, 480, 0.08, 0.10);
        assert!(on >= 480 - 8 - 480 / 6 - 8, "{on}");
        // The machine changes: prefetch starts to cost; the guard turns it off.
        let later = run(&mut g, 480, 0.15, 0.10);
        assert!(later <= 8 * 3 + 480 / 6 + 8, "{later}");
    }
}
