//! Planned prefetch through the C ABI: a runtime that owns its cache and reads asks
//! which forecast experts are worth a read now (`mc_planner_plan`), and tells the
//! planner when each token starts, each layer routes and how long its reads take.

use std::ffi::c_int;

use planner::{LinkQueue, PlanTimings, StagingPlanner};

use crate::{free_box, guard, non_null, non_null_mut, slice, slice_mut, Failure, MC_ERR_ARG};

/// A prefetch planner (one per stream of requests; one thread at a time).
pub struct mc_planner {
    planner: StagingPlanner,
    /// `mc_planner_plan`'s `resident` as booleans, kept between calls.
    resident: Vec<bool>,
}

const _: () = {
    const fn movable<T: Send>() {}
    movable::<mc_planner>();
};

/// What a planner decided so far and the timings it plans with.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct mc_plan_report {
    /// Forecast experts offered, staged, judged too late, judged not worth a read.
    pub offered: u64,
    pub staged: u64,
    pub late: u64,
    pub not_worth: u64,
    /// The link's time per read and the time between two lookups (microseconds).
    pub read_us: f64,
    pub layer_us: f64,
    /// The mean calibrated probability of the forecasts offered with a probability
    /// (-1 before any).
    pub calibrated_probability: f64,
    /// Where the link is bound (a layer's compute shorter than a read), the precision
    /// above which a read for the next lookup is staged, less the probability that the
    /// expert it evicts is needed (-1 where the link model judges).
    pub break_even_precision: f64,
}

/// A planner input error as the C ABI's argument error.
pub(crate) fn planner_error(e: planner::StagingError) -> Failure {
    Failure(MC_ERR_ARG, e.to_string())
}

/// A planner into `*out` for a model of `n_moe_layers` MoE layers of `n_experts`
/// experts (`top_k` routed per token) and a cache of `capacity` experts. With
/// `read_us` and `layer_us` both above 0 it plans with those timings (microseconds
/// per expert read and per layer); with both 0 it measures them from
/// `mc_planner_read_done` and the time between `mc_planner_layer_routed` calls.
///
/// # Safety
/// `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn mc_planner_new(
    n_moe_layers: u32,
    n_experts: u32,
    top_k: u32,
    capacity: u32,
    read_us: f64,
    layer_us: f64,
    out: *mut *mut mc_planner,
) -> c_int {
    guard(|| {
        let out = non_null_mut(out, "out")?;
        let stated =
            (read_us != 0.0 || layer_us != 0.0).then_some(PlanTimings { read_us, layer_us });
        let planner = StagingPlanner::new(
            n_moe_layers as usize,
            n_experts as usize,
            top_k as usize,
            capacity as usize,
            stated,
        )
        .map_err(planner_error)?;
        *out = Box::into_raw(Box::new(mc_planner {
            planner,
            resident: Vec::new(),
        }));
        Ok(())
    })
}

/// Frees a planner (null is ignored).
///
/// # Safety
/// `p` comes from `mc_planner_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn mc_planner_free(p: *mut mc_planner) {
    // SAFETY: `p` was made by `mc_planner_new` (documented).
    unsafe { free_box(p) }
}

/// A decode step starts (before its first MoE layer routes).
///
/// # Safety
/// `p` is a live planner.
#[no_mangle]
pub unsafe extern "C" fn mc_planner_token_started(p: *mut mc_planner) -> c_int {
    guard(|| {
        non_null_mut(p, "p")?.planner.token_started();
        Ok(())
    })
}

/// MoE layer `layer` of the current token routed to `experts[n]`, of which
/// `demand_reads` were read on demand (not resident, not staged in time).
///
/// # Safety
/// `p` is a live planner; `experts` holds `n` values.
#[no_mangle]
pub unsafe extern "C" fn mc_planner_layer_routed(
    p: *mut mc_planner,
    layer: u32,
    experts: *const u16,
    n: u32,
    demand_reads: u32,
) -> c_int {
    guard(|| {
        let p = non_null_mut(p, "p")?;
        let experts = slice(experts, n as usize, "experts")?;
        p.planner
            .layer_routed(layer as usize, experts, demand_reads as usize)
            .map_err(planner_error)
    })
}

/// A staged read evicted expert `id` (`layer * n_experts + expert`): the planner learns
/// what a staged read's eviction costs from whether it is needed again soon. Let a
/// staged expert its layer routed without be the first your cache evicts.
///
/// # Safety
/// `p` is a live planner.
#[no_mangle]
pub unsafe extern "C" fn mc_planner_evicted(p: *mut mc_planner, id: u32) -> c_int {
    guard(|| {
        let p = non_null_mut(p, "p")?;
        p.planner.evicted(id).map_err(planner_error)
    })
}

/// A read (on demand or staged) took `seconds` of the link; with several reads at
/// once, the link's time per read.
///
/// # Safety
/// `p` is a live planner.
#[no_mangle]
pub unsafe extern "C" fn mc_planner_read_done(p: *mut mc_planner, seconds: f64) -> c_int {
    guard(|| {
        let p = non_null_mut(p, "p")?;
        p.planner.read_done(seconds).map_err(planner_error)
    })
}

/// Issuing one staged read took `seconds` of the decoding thread (where reads take the
/// runtime's own CPU, as the page cache's do): every staged read is charged that much.
///
/// # Safety
/// `p` is a live planner.
#[no_mangle]
pub unsafe extern "C" fn mc_planner_read_issued(p: *mut mc_planner, seconds: f64) -> c_int {
    guard(|| {
        let p = non_null_mut(p, "p")?;
        p.planner.read_issued(seconds).map_err(planner_error)
    })
}

/// A layer's demand reads held the decode thread `seconds` (waiting for them, or
/// working meanwhile, as on a forecast): the layer's own compute excludes it.
///
/// # Safety
/// `p` is a live planner.
#[no_mangle]
pub unsafe extern "C" fn mc_planner_stalled(p: *mut mc_planner, seconds: f64) -> c_int {
    guard(|| {
        let p = non_null_mut(p, "p")?;
        p.planner.stalled(seconds).map_err(planner_error)
    })
}

/// Offers MoE layer `layer`'s forecast `ranking[n]` (best first; `probs[n]`: the
/// forecaster's probabilities, or null to plan with ranks; `resident[n]`: nonzero
/// where the expert is resident or being read already, or null) for the layer's next
/// lookup (this token's if it has not routed yet, else the next token's).
/// `queued_reads`: reads queued or running on the link now; `free_slots`: cache slots
/// free now. Writes to `out[room]` the experts to stage now, in order, as
/// `layer * n_experts + expert` (forecasts of other layers judged not worth a read
/// earlier may come back), and their count to `*n_out`. Read them one after another;
/// a staged read whose layer has routed without it can be dropped.
///
/// # Safety
/// `p` is a live planner; `ranking` (and `probs`, `resident` unless null) hold `n`
/// values; `out` has room for `room` values; `n_out` is valid.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn mc_planner_plan(
    p: *mut mc_planner,
    layer: u32,
    ranking: *const u16,
    probs: *const f32,
    resident: *const u8,
    n: u32,
    queued_reads: u32,
    free_slots: u32,
    out: *mut u32,
    room: u32,
    n_out: *mut u32,
) -> c_int {
    guard(|| {
        let p = non_null_mut(p, "p")?;
        let n_out = non_null_mut(n_out, "n_out")?;
        let n = n as usize;
        let ranking = slice(ranking, n, "ranking")?;
        let probs = (!probs.is_null())
            .then(|| slice(probs, n, "probs"))
            .transpose()?;
        let resident = if resident.is_null() {
            None
        } else {
            let given = slice(resident, n, "resident")?;
            p.resident.clear();
            p.resident.extend(given.iter().map(|&x| x != 0));
            Some(std::mem::take(&mut p.resident))
        };
        let out = slice_mut(out, room as usize, "out")?;
        let queue = LinkQueue {
            queued_reads: queued_reads as usize,
            free_slots: free_slots as usize,
        };
        let staged = p
            .planner
            .plan(
                layer as usize,
                ranking,
                probs,
                resident.as_deref(),
                queue,
                out.len(),
            )
            .map_err(planner_error)?;
        if let Some(r) = resident {
            p.resident = r;
        }
        out[..staged.len()].copy_from_slice(&staged);
        *n_out = staged.len() as u32;
        Ok(())
    })
}

/// What the planner decided so far and the timings it plans with, into `*out`.
///
/// # Safety
/// `p` is a live planner; `out` is valid.
#[no_mangle]
pub unsafe extern "C" fn mc_planner_report(
    p: *const mc_planner,
    out: *mut mc_plan_report,
) -> c_int {
    guard(|| {
        let p = non_null(p, "p")?;
        let out = non_null_mut(out, "out")?;
        let (c, s) = (p.planner.counts(), p.planner.state());
        *out = mc_plan_report {
            offered: c.offered,
            staged: c.issued,
            late: c.late,
            not_worth: c.not_worth,
            read_us: s.read_us,
            layer_us: s.layer_period_us,
            calibrated_probability: s.calibrated_probability.unwrap_or(-1.0),
            break_even_precision: s.break_even_precision.unwrap_or(-1.0),
        };
        Ok(())
    })
}
