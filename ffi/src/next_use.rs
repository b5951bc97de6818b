//! Next-use eviction through the C ABI: a runtime that owns its expert cache tells the
//! forecaster each decode step's layer routing (`mc_next_use_layer_routed`) and, when it must drop
//! an expert, asks when each of a layer's experts is expected next
//! (`mc_next_use_layer`): the resident expert expected latest goes first, the policy
//! `moecast simulate` and `moecast run` call `next-use`.

use std::ffi::c_int;

use planner::NextUseForecast;

use crate::{free_box, guard, non_null, non_null_mut, planner_error, slice, slice_mut};

/// Next-use estimates of every expert of a model (one cache; one thread at a time).
pub struct mc_next_use {
    forecast: NextUseForecast,
}

const _: () = {
    const fn movable<T: Send>() {}
    movable::<mc_next_use>();
};

/// A forecaster into `*out` for a model of `n_moe_layers` MoE layers of `n_experts`
/// experts (each from 1 to 65535, 2^24 experts in all), before any routing.
///
/// # Safety
/// `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn mc_next_use_new(
    n_moe_layers: u32,
    n_experts: u32,
    out: *mut *mut mc_next_use,
) -> c_int {
    guard(|| {
        let out = non_null_mut(out, "out")?;
        let forecast = NextUseForecast::checked(n_moe_layers as usize, n_experts as usize)
            .map_err(planner_error)?;
        *out = Box::into_raw(Box::new(mc_next_use { forecast }));
        Ok(())
    })
}

/// Frees a forecaster (null is ignored).
///
/// # Safety
/// `f` comes from `mc_next_use_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn mc_next_use_free(f: *mut mc_next_use) {
    // SAFETY: `f` was made by `mc_next_use_new` (documented).
    unsafe { free_box(f) }
}

/// MoE layer `layer` of a decode step routed to the `n` experts at `experts` (indices
/// within the layer; repeats count once). Call it for every decode step's routed layer,
/// in order, before asking for that layer's estimates. A prompt's batch is not one
/// visit: `moecast run` does not tell it, and keys the batch's experts with the
/// estimates as they stand (`mc_next_use_layer`).
///
/// # Safety
/// `f` is a live forecaster; `experts` holds `n` values.
#[no_mangle]
pub unsafe extern "C" fn mc_next_use_layer_routed(
    f: *mut mc_next_use,
    layer: u32,
    experts: *const u16,
    n: u32,
) -> c_int {
    guard(|| {
        let f = non_null_mut(f, "f")?;
        let experts = slice(experts, n as usize, "experts")?;
        f.forecast
            .layer_routed(layer as usize, experts)
            .map_err(planner_error)
    })
}

/// The expected next use of each of MoE layer `layer`'s experts into `out[n]` (`n` is
/// the model's expert count), as of the latest routed layer: in layer steps since the
/// first routed layer (each routed layer is one step; a token's MoE layers are
/// `n_moe_layers` steps). The resident expert with the largest value is the one to drop.
/// Estimates follow each expert's idle time and use rate, so an expert's value changes
/// as its layer is routed: ask again after each `mc_next_use_layer_routed` of the layer.
///
/// # Safety
/// `f` is a live forecaster; `out` has room for `n` values.
#[no_mangle]
pub unsafe extern "C" fn mc_next_use_layer(
    f: *const mc_next_use,
    layer: u32,
    out: *mut f64,
    n: u32,
) -> c_int {
    guard(|| {
        let f = non_null(f, "f")?;
        let out = slice_mut(out, n as usize, "out")?;
        f.forecast
            .layer_due(layer as usize, out)
            .map_err(planner_error)
    })
}
