//! The online blend through the C ABI: `mc_blend_open`, `mc_blend_forecast` after each
//! routed layer, `mc_blend_observe` with each token's routing.

use std::ffi::{c_char, c_int};
use std::path::Path;

use datasets::examples::RoutingShape;
use predictor::blend::OnlineBlend;

use crate::{
    c_str, checked_experts, fail, free_box, guard, non_null, non_null_mut, slice, slice_mut,
    write_shape, MC_ERR_ARG, MC_ERR_OPEN,
};

/// An online blend: a training-free forecaster of the next layers' experts (co-activation
/// counts, the last two tokens' experts and the request's use, weighed by a logistic
/// model that learns while the model decodes). One per stream of requests, used by one
/// thread at a time.
pub struct mc_blend {
    blend: OnlineBlend,
    shape: RoutingShape,
}

impl mc_blend {
    /// MoE layers, experts per layer, experts routed per token.
    fn dims(&self) -> (usize, usize, usize) {
        (self.shape.n_moe, self.shape.n_experts, self.shape.top_k)
    }
}

const _: () = {
    const fn movable<T: Send>() {}
    movable::<mc_blend>();
};

/// Opens an online blend into `*out`; its counts start as those of `path`: a predictor
/// directory (the counts stored beside the predictor) or a trace in any storage form
/// (counts fitted on all of it).
///
/// # Safety
/// `path` is a NUL-terminated path; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn mc_blend_open(path: *const c_char, out: *mut *mut mc_blend) -> c_int {
    guard(|| {
        let out = non_null_mut(out, "out")?;
        let path = c_str(path, "path")?;
        let counts = predictor::blend::load_counts(Path::new(path), usize::MAX)
            .or_else(|e| fail(MC_ERR_OPEN, e.to_string()))?;
        let shape = counts.shape;
        let blend = OnlineBlend::new(counts, OnlineBlend::HORIZON);
        *out = Box::into_raw(Box::new(mc_blend { blend, shape }));
        Ok(())
    })
}

/// Frees a blend (null is ignored).
///
/// # Safety
/// `b` comes from `mc_blend_open` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn mc_blend_free(b: *mut mc_blend) {
    // SAFETY: `b` was made by `mc_blend_open` (documented).
    unsafe { free_box(b) }
}

/// The blend's shape: MoE layers, experts per layer, experts routed per token, and the
/// layers each forecast covers.
///
/// # Safety
/// Every pointer is valid (none may be null).
#[no_mangle]
pub unsafe extern "C" fn mc_blend_shape(
    b: *const mc_blend,
    n_moe_layers: *mut u32,
    n_experts: *mut u32,
    top_k: *mut u32,
    horizon: *mut u32,
) -> c_int {
    guard(|| {
        let b = non_null(b, "b")?;
        write_shape([
            (n_moe_layers, b.shape.n_moe, "n_moe_layers"),
            (n_experts, b.shape.n_experts, "n_experts"),
            (top_k, b.shape.top_k, "top_k"),
            (horizon, b.blend.horizon(), "horizon"),
        ])
    })
}

/// A new request: the blend forgets its recent tokens and the request's use (its
/// weights and counts stay).
///
/// # Safety
/// `b` is a live blend.
#[no_mangle]
pub unsafe extern "C" fn mc_blend_reset(b: *mut mc_blend) -> c_int {
    guard(|| {
        non_null_mut(b, "b")?.blend.start_request();
        Ok(())
    })
}

/// Layer `layer` of the current token routed to `experts[top_k]` (`earlier[top_k]`: the
/// token's layer `layer - 1`, or null): `out[horizon * budget]`, the `budget` most likely
/// experts of the `horizon` layers after it, best first, and, unless `probs` is null,
/// their forecast probabilities in `probs[horizon * budget]`. Row `i` is layer
/// `layer + 1 + i`, or, past the last MoE layer, the next token's layer
/// `layer + 1 + i - n_moe_layers` (forecast before its id is known).
///
/// Call it at most once per layer of a token (each call's forecasts are learned from
/// when the token is observed). `earlier` is not read at layer 0.
///
/// # Safety
/// `b` is a live blend; `experts` (and `earlier` unless null) hold `top_k` values; `out`
/// (and `probs` unless null) have room for `horizon * budget`; `out`, `probs`, `experts`
/// and `earlier` do not overlap.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn mc_blend_forecast(
    b: *mut mc_blend,
    layer: u32,
    experts: *const u16,
    earlier: *const u16,
    budget: u32,
    out: *mut u16,
    probs: *mut f32,
) -> c_int {
    guard(|| {
        let b = non_null_mut(b, "b")?;
        let (m, e, k) = b.dims();
        let (l, budget) = (layer as usize, budget as usize);
        if l >= m {
            return fail(MC_ERR_ARG, format!("layer {l} is outside 0..{m}"));
        }
        if budget == 0 || budget > e {
            return fail(MC_ERR_ARG, format!("budget {budget} is outside 1..={e}"));
        }
        let given = checked_experts(slice(experts, k, "experts")?, e, k, "experts")?;
        let earlier = match (earlier.is_null(), l) {
            (true, _) | (_, 0) => None,
            _ => Some(checked_experts(
                slice(earlier, k, "earlier")?,
                e,
                k,
                "earlier",
            )?),
        };
        let h = b.blend.horizon();
        let out = slice_mut(out, h * budget, "out")?;
        let probs = if probs.is_null() {
            None
        } else {
            Some(slice_mut(probs, h * budget, "probs")?)
        };
        b.blend.forecast_top(l, given, earlier, budget, out, probs);
        Ok(())
    })
}

/// The current token's full routing, `experts[n_moe_layers * top_k]`: the blend learns
/// from its forecasts of this token and counts it; the next forecast is of the next
/// token. `token` is its id (0xFFFFFFFF if unknown).
///
/// # Safety
/// `b` is a live blend; `experts` holds `n_moe_layers * top_k` values.
#[no_mangle]
pub unsafe extern "C" fn mc_blend_observe(
    b: *mut mc_blend,
    token: u32,
    experts: *const u16,
) -> c_int {
    guard(|| {
        let b = non_null_mut(b, "b")?;
        let (m, e, k) = b.dims();
        let experts = checked_experts(slice(experts, m * k, "experts")?, e, k, "experts")?;
        let layers: Vec<Option<&[u16]>> = experts.chunks(k).map(Some).collect();
        b.blend.token_routed(token, &layers);
        Ok(())
    })
}
