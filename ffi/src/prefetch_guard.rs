//! The prefetch guard through the C ABI: a runtime times its decode steps and asks,
//! step by step, whether prefetch runs (`mc_guard_enabled`), so what the planner's model
//! of the link leaves out (a read's CPU time, the forecasts' own cost) is measured.

use std::ffi::c_int;

use planner::PrefetchGuard;

use crate::{free_box, guard, non_null, non_null_mut, Failure, MC_ERR_ARG};

/// A prefetch guard (one per decoding stream; one thread at a time).
pub struct mc_guard {
    guard: PrefetchGuard,
}

const _: () = {
    const fn movable<T: Send>() {}
    movable::<mc_guard>();
};

/// A window of decode steps the guard measured.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct mc_guard_window {
    /// 1 when the step just told ended a measured window (the fields below are set).
    pub ended: u8,
    /// 1 when prefetch ran in that window.
    pub prefetch: u8,
    /// The window's mean step time, seconds.
    pub mean_s: f64,
}

/// A guard into `*out`: decode steps in windows of `window` (8 in `moecast run`),
/// prefetch on or off per window; the setting not in use is measured again after
/// `explore_every` windows (6) at first, less often each time the setting in use
/// holds; the setting follows the mean of the last 8 such comparisons.
///
/// # Safety
/// `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn mc_guard_new(
    window: u32,
    explore_every: u32,
    out: *mut *mut mc_guard,
) -> c_int {
    guard(|| {
        let out = non_null_mut(out, "out")?;
        if window == 0 || explore_every == 0 {
            return Err(Failure(
                MC_ERR_ARG,
                format!("window {window} and explore_every {explore_every} must be at least 1"),
            ));
        }
        let g = PrefetchGuard::new(window as usize, explore_every as usize);
        *out = Box::into_raw(Box::new(mc_guard { guard: g }));
        Ok(())
    })
}

/// Frees a guard (null is ignored).
///
/// # Safety
/// `g` comes from `mc_guard_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn mc_guard_free(g: *mut mc_guard) {
    // SAFETY: `g` was made by `mc_guard_new` (documented).
    unsafe { free_box(g) }
}

/// `*out` = 1 when the next decode step should forecast and stage, else 0.
///
/// # Safety
/// `g` is a live guard; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn mc_guard_enabled(g: *const mc_guard, out: *mut u8) -> c_int {
    guard(|| {
        let g = non_null(g, "g")?;
        *non_null_mut(out, "out")? = u8::from(g.guard.enabled());
        Ok(())
    })
}

/// A decode step took `seconds` (its whole time, forecasts included). When `window` is
/// not null it says whether the step ended a measured window, and that window.
///
/// # Safety
/// `g` is a live guard; `window` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn mc_guard_step_done(
    g: *mut mc_guard,
    seconds: f64,
    window: *mut mc_guard_window,
) -> c_int {
    guard(|| {
        let g = non_null_mut(g, "g")?;
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(Failure(
                MC_ERR_ARG,
                format!("step time {seconds} s is not a duration"),
            ));
        }
        let ended = g.guard.step_done(seconds);
        if !window.is_null() {
            *non_null_mut(window, "window")? = match ended {
                Some((prefetch, mean_s)) => mc_guard_window {
                    ended: 1,
                    prefetch: u8::from(prefetch),
                    mean_s,
                },
                None => mc_guard_window::default(),
            };
        }
        Ok(())
    })
}

/// `*out` = the decode steps run without prefetch so far.
///
/// # Safety
/// `g` is a live guard; `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn mc_guard_steps_off(g: *const mc_guard, out: *mut u64) -> c_int {
    guard(|| {
        let g = non_null(g, "g")?;
        *non_null_mut(out, "out")? = g.guard.steps_off;
        Ok(())
    })
}
