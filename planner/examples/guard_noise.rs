//! How `PrefetchGuard` does when steps are noisy: decode steps whose time varies
//! uniformly by +-`spread` (a seeded generator), prefetch faster or slower than none by
//! a fixed share, 8-step windows as the runtimes use, 600 steps, 40 seeds. Prints, per
//! setting, the mean steps run with prefetch and the time lost against running the
//! better setting throughout, and the mean loss over all settings.
//!
//! `cargo run -p planner --example guard_noise`

use planner::PrefetchGuard;

/// A step-time factor in `1 +- spread`, from seed `x`'s linear congruential sequence.
fn noisy(mut x: u64, spread: f64) -> impl FnMut() -> f64 {
    move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        1.0 - spread + 2.0 * spread * (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn main() {
    const STEPS: usize = 600;
    const SEEDS: u64 = 40;
    println!(
        "prefetch's step time over none's, step spread: mean steps with prefetch of {STEPS}, \
         time lost against the better setting ({SEEDS} seeds)"
    );
    let mut lost_sum = 0.0;
    let mut cells = 0;
    for spread in [0.2, 0.4, 0.8] {
        for ratio in [0.85, 0.94, 0.98, 1.02, 1.06, 1.15] {
            let (mut on_steps, mut lost) = (0, 0.0);
            for seed in 1..=SEEDS {
                let mut g = PrefetchGuard::new(8, 6);
                let mut noise = noisy(seed, spread);
                let mut total = 0.0;
                for _ in 0..STEPS {
                    let on = g.enabled();
                    on_steps += on as usize;
                    let s = 0.1 * noise() * if on { ratio } else { 1.0 };
                    total += s;
                    g.step_done(s);
                }
                lost += total / (0.1 * STEPS as f64 * f64::min(ratio, 1.0)) - 1.0;
            }
            let lost = 100.0 * lost / SEEDS as f64;
            lost_sum += lost;
            cells += 1;
            println!(
                "  {ratio:.2}x, +-{:.0}%: {} steps, {lost:.2}% lost",
                spread * 100.0,
                on_steps / SEEDS as usize
            );
        }
    }
    println!("mean time lost: {:.2}%", lost_sum / cells as f64);
}
