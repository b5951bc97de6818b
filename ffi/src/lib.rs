//! The C ABI of the moecast expert predictor (`libmoecast`, header
//! `ffi/include/moecast.h`, generated from this file by cbindgen).
//!
//! A runtime opens a trained predictor directory once (`mc_predictor_open`), makes one
//! session per sequence it generates (`mc_session_new`), and per token asks for the
//! experts to stage:
//!
//! 1. `mc_session_predict_next` once the token's id is sampled: every MoE layer;
//! 2. `mc_session_predict_lookahead` after layers `0..known` of the token routed
//!    (lookahead predictors): the next `horizon` layers;
//! 3. `mc_session_observe` with the token's full routing, which advances the session.
//!
//! Without a trained predictor, an online blend (`mc_blend_open` on a predictor
//! directory or a trace) forecasts the next layers after each routed layer
//! (`mc_blend_forecast`) and learns from each token's routing (`mc_blend_observe`).
//!
//! To decide which forecast experts are worth a read, a planner (`mc_planner_new`) is
//! told when each token starts and each layer routes and how long reads take, and
//! answers each forecast offered to it (`mc_planner_plan`) with the experts to stage
//! now: a read that cannot arrive in time or would delay demand reads more than it
//! saves is not staged (where a layer computes for less than a read takes, only reads
//! for the next lookup above a break-even precision are). A guard (`mc_guard_new`) told
//! each decode step's time (`mc_guard_step_done`) says whether the next step should
//! prefetch at all (`mc_guard_enabled`): prefetch runs in the windows of steps where it
//! measures faster.
//! A runtime that evicts by estimated next use (`mc_next_use_new`) tells it each decode
//! step's layer routing (`mc_next_use_layer_routed`) and drops the resident expert
//! expected latest (`mc_next_use_layer`).
//!
//! Every function returns [`MC_OK`] (0) or a negative `MC_ERR_*` code; the message of
//! the last error on the calling thread is `mc_last_error()`. Null pointers, sizes that
//! do not fit and expert ids out of range are errors, never undefined behaviour, and a
//! panic inside the library becomes [`MC_ERR_PANIC`]: no panic crosses the boundary.
//!
//! Threads: an `mc_predictor` is immutable once open and may be shared by any number of
//! threads (each making its own sessions); an `mc_session` belongs to one thread at a
//! time; an `mc_blend`, an `mc_planner`, an `mc_guard` and an `mc_next_use` too.

#![allow(non_camel_case_types)]

mod blend;
mod next_use;
mod prefetch_guard;
mod staging;
mod trace;
pub use blend::*;
pub use next_use::*;
pub use prefetch_guard::*;
use staging::planner_error;
pub use staging::*;
pub use trace::*;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use predictor::device::BackendKind;
use predictor::{ExpertForecast, LoadedPredictor, OnlinePredictor, Task};

/// Success.
pub const MC_OK: c_int = 0;
/// A required pointer was null.
pub const MC_ERR_NULL: c_int = -1;
/// An argument does not fit the predictor (a size, a budget, an expert id, a layer count).
pub const MC_ERR_ARG: c_int = -2;
/// The predictor directory could not be read or is not a predictor checkpoint.
pub const MC_ERR_OPEN: c_int = -3;
/// The predictor refused or failed the forecast (the message says why).
pub const MC_ERR_PREDICT: c_int = -4;
/// The library panicked; the message holds the panic's text. The session may be
/// inconsistent: free it.
pub const MC_ERR_PANIC: c_int = -5;

/// A loaded predictor checkpoint (immutable; shareable across threads).
pub struct mc_predictor {
    loaded: LoadedPredictor,
}

/// One sequence's incremental state (one thread at a time).
pub struct mc_session {
    online: OnlinePredictor,
}

/// The thread rules the header states, checked by the compiler: a predictor may be
/// shared by threads, a session moved to another thread.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    const fn movable<T: Send>() {}
    shareable::<mc_predictor>();
    movable::<mc_session>();
};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// An error with its code and message.
struct Failure(c_int, String);

fn fail<T>(code: c_int, msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure(code, msg.into()))
}

/// Runs `f`, turning an error or a panic into its code and the thread's last error.
fn guard(f: impl FnOnce() -> Result<(), Failure>) -> c_int {
    let outcome = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Failure(MC_ERR_PANIC, format!("internal error: {text}")))
    });
    match outcome {
        Ok(()) => MC_OK,
        Err(Failure(code, msg)) => {
            let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
            LAST_ERROR.with(|e| *e.borrow_mut() = msg);
            code
        }
    }
}

fn non_null<'a, T>(p: *const T, name: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller passes either null (refused here) or a pointer this library
    // returned / a valid object, as the header documents.
    unsafe { p.as_ref() }.ok_or_else(|| Failure(MC_ERR_NULL, format!("{name} is null")))
}

fn non_null_mut<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: as in `non_null`; the session is used by one thread at a time.
    unsafe { p.as_mut() }.ok_or_else(|| Failure(MC_ERR_NULL, format!("{name} is null")))
}

/// `len` values at `p` (null refused unless `len` is 0).
fn slice<'a, T>(p: *const T, len: usize, name: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return fail(MC_ERR_NULL, format!("{name} is null"));
    }
    // SAFETY: the header documents that `p` holds `len` values.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

fn slice_mut<'a, T>(p: *mut T, len: usize, name: &str) -> Result<&'a mut [T], Failure> {
    if p.is_null() {
        return fail(MC_ERR_NULL, format!("{name} is null"));
    }
    // SAFETY: the header documents that `p` has room for `len` values.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// The NUL-terminated UTF-8 string at `p`, named `name` in errors.
fn c_str<'a>(p: *const c_char, name: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return fail(MC_ERR_NULL, format!("{name} is null"));
    }
    // SAFETY: not null, and the header documents that `p` is NUL-terminated.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .or_else(|_| fail(MC_ERR_ARG, format!("{name} is not UTF-8")))
}

/// Frees an object this library returned (null is ignored); a panic in its drop stays
/// inside.
///
/// # Safety
/// `p` is null or was made by `Box::into_raw` here, and is not used afterwards.
unsafe fn free_box<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: documented above.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(p) })));
    }
}

/// Writes a shape's four values (MoE layers, experts, top-k, horizon) through their
/// pointers, each named in the error if null.
fn write_shape(values: [(*mut u32, usize, &str); 4]) -> Result<(), Failure> {
    for (ptr, value, name) in values {
        *non_null_mut(ptr, name)? = value as u32;
    }
    Ok(())
}

/// The message of the last error on this thread ("" if none); valid until the next
/// call into the library on this thread.
#[no_mangle]
pub extern "C" fn mc_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Loads the predictor directory `dir` (written by `moecast train`) into `*out`.
///
/// # Safety
/// `dir` is a NUL-terminated path; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn mc_predictor_open(
    dir: *const c_char,
    out: *mut *mut mc_predictor,
) -> c_int {
    guard(|| {
        let out = non_null_mut(out, "out")?;
        let dir = c_str(dir, "dir")?;
        let loaded = LoadedPredictor::load(Path::new(dir), &BackendKind::Flex.device())
            .or_else(|e| fail(MC_ERR_OPEN, e.to_string()))?;
        *out = Box::into_raw(Box::new(mc_predictor { loaded }));
        Ok(())
    })
}

/// Frees a predictor (null is ignored). Its sessions stay valid.
///
/// # Safety
/// `p` comes from `mc_predictor_open` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn mc_predictor_free(p: *mut mc_predictor) {
    // SAFETY: `p` was made by `mc_predictor_open` (documented).
    unsafe { free_box(p) }
}

/// The predictor's shape: MoE layers, experts per layer, experts routed per token, and
/// the layers a lookahead forecast covers (0 for next-token predictors).
///
/// # Safety
/// Every pointer is valid (none may be null).
#[no_mangle]
pub unsafe extern "C" fn mc_predictor_shape(
    p: *const mc_predictor,
    n_moe_layers: *mut u32,
    n_experts: *mut u32,
    top_k: *mut u32,
    horizon: *mut u32,
) -> c_int {
    guard(|| {
        let c = &non_null(p, "p")?.loaded.card.config;
        write_shape([
            (n_moe_layers, c.routing.n_moe, "n_moe_layers"),
            (n_experts, c.routing.n_experts, "n_experts"),
            (top_k, c.routing.top_k, "top_k"),
            (horizon, c.lookahead_horizon(), "horizon"),
        ])
    })
}

/// Width of the router input a lookahead forecast reads
/// (`mc_session_predict_lookahead_input`), 0 when the predictor reads none.
///
/// # Safety
/// `p` and `dim` are valid.
#[no_mangle]
pub unsafe extern "C" fn mc_predictor_router_input_dim(
    p: *const mc_predictor,
    dim: *mut u32,
) -> c_int {
    guard(|| {
        let c = &non_null(p, "p")?.loaded.card.config;
        *non_null_mut(dim, "dim")? = if c.features.hidden() {
            c.router_input_dim as u32
        } else {
            0
        };
        Ok(())
    })
}

/// A new session (an empty sequence) of predictor `p` into `*out`.
///
/// # Safety
/// `p` is a live predictor; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn mc_session_new(
    p: *const mc_predictor,
    out: *mut *mut mc_session,
) -> c_int {
    guard(|| {
        let out = non_null_mut(out, "out")?;
        let online = OnlinePredictor::new(non_null(p, "p")?.loaded.clone());
        *out = Box::into_raw(Box::new(mc_session { online }));
        Ok(())
    })
}

/// Frees a session (null is ignored).
///
/// # Safety
/// `s` comes from `mc_session_new` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn mc_session_free(s: *mut mc_session) {
    // SAFETY: `s` was made by `mc_session_new` (documented).
    unsafe { free_box(s) }
}

/// Starts a new sequence in session `s`.
///
/// # Safety
/// `s` is a live session.
#[no_mangle]
pub unsafe extern "C" fn mc_session_reset(s: *mut mc_session) -> c_int {
    guard(|| {
        non_null_mut(s, "s")?.online.reset();
        Ok(())
    })
}

fn check_budget(p: &LoadedPredictor, budget: u32) -> Result<(), Failure> {
    let e = p.card.config.routing.n_experts;
    if budget == 0 || budget as usize > e {
        return fail(MC_ERR_ARG, format!("budget {budget} is outside 1..={e}"));
    }
    Ok(())
}

/// Writes the all-layer forecast `forecast` makes of session `s` into `out`
/// (`n_moe_layers * budget` values).
fn next_forecast(
    s: *mut mc_session,
    budget: u32,
    out: *mut u16,
    forecast: impl FnOnce(&mut OnlinePredictor) -> predictor::Result<ExpertForecast>,
) -> c_int {
    guard(|| {
        let s = non_null_mut(s, "s")?;
        check_budget(s.online.predictor(), budget)?;
        let m = s.online.predictor().card.config.routing.n_moe;
        let out = slice_mut(out, m * budget as usize, "out")?;
        let f = forecast(&mut s.online).or_else(|e| fail(MC_ERR_PREDICT, e.to_string()))?;
        out.copy_from_slice(&f.top_rows(budget as usize, m));
        Ok(())
    })
}

/// Every MoE layer of the token just sampled, id `token`:
/// `out[n_moe_layers * budget]`, each layer's `budget` most likely experts, best first.
///
/// # Safety
/// `s` is a live session; `out` has room for `n_moe_layers * budget` values.
#[no_mangle]
pub unsafe extern "C" fn mc_session_predict_next(
    s: *mut mc_session,
    token: u32,
    budget: u32,
    out: *mut u16,
) -> c_int {
    next_forecast(s, budget, out, |o| o.predict_next(token))
}

/// Every MoE layer of the token after the last observed one, before its id is sampled
/// (predictors trained with `--token-dropout`): `out[n_moe_layers * budget]`.
///
/// # Safety
/// As `mc_session_predict_next`.
#[no_mangle]
pub unsafe extern "C" fn mc_session_predict_next_unknown(
    s: *mut mc_session,
    budget: u32,
    out: *mut u16,
) -> c_int {
    next_forecast(s, budget, out, |o| o.predict_next_unknown())
}

/// The routing `experts[layers * top_k]` as per-layer slices, ids checked.
fn layers_of<'a>(
    p: &LoadedPredictor,
    experts: &'a [u16],
    layers: usize,
) -> Result<Vec<&'a [u16]>, Failure> {
    let r = p.card.config.routing;
    let experts = checked_experts(experts, r.n_experts, r.top_k, "experts")?;
    Ok(experts.chunks(r.top_k).take(layers).collect())
}

/// `ids` (`top_k` per layer) with every expert below `n_experts`; the first that is not
/// is named with its layer and `what` in the error.
fn checked_experts<'a>(
    ids: &'a [u16],
    n_experts: usize,
    top_k: usize,
    what: &str,
) -> Result<&'a [u16], Failure> {
    match ids
        .iter()
        .enumerate()
        .find(|(_, &x)| x as usize >= n_experts)
    {
        Some((i, x)) => fail(
            MC_ERR_ARG,
            format!(
                "expert {x} at layer {} of {what} is outside 0..{n_experts}",
                i / top_k.max(1)
            ),
        ),
        None => Ok(ids),
    }
}

/// Lookahead after layers `0..known` of token `token` routed (`experts[known * top_k]`,
/// each layer's routed experts): `out[horizon * budget]` for layers
/// `known .. known + horizon - 1`; layers past the last MoE layer are filled with
/// 0xFFFF. Lookahead predictors that read no router input.
///
/// # Safety
/// `s` is a live session; `experts` holds `known * top_k` values; `out` has room for
/// `horizon * budget`.
#[no_mangle]
pub unsafe extern "C" fn mc_session_predict_lookahead(
    s: *mut mc_session,
    token: u32,
    known: u32,
    experts: *const u16,
    budget: u32,
    out: *mut u16,
) -> c_int {
    // SAFETY: forwarded as documented; no router input.
    unsafe {
        mc_session_predict_lookahead_input(
            s,
            token,
            known,
            experts,
            std::ptr::null(),
            0,
            budget,
            out,
        )
    }
}

/// `mc_session_predict_lookahead` for predictors that also read the last known layer's
/// router input (`router_input[input_len]`, `input_len` =
/// `mc_predictor_router_input_dim`; null and 0 for predictors that read none).
///
/// # Safety
/// As `mc_session_predict_lookahead`; `router_input` holds `input_len` values.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn mc_session_predict_lookahead_input(
    s: *mut mc_session,
    token: u32,
    known: u32,
    experts: *const u16,
    router_input: *const f32,
    input_len: usize,
    budget: u32,
    out: *mut u16,
) -> c_int {
    guard(|| {
        let s = non_null_mut(s, "s")?;
        let p = s.online.predictor();
        check_budget(p, budget)?;
        let c = &p.card.config;
        if c.task != Task::Lookahead {
            return fail(
                MC_ERR_ARG,
                "this predictor was trained for next-token forecasts, not lookahead",
            );
        }
        let (m, k) = (c.routing.n_moe, c.routing.top_k);
        let known = known as usize;
        if known == 0 || known >= m {
            return fail(MC_ERR_ARG, format!("known {known} is outside 1..{m}"));
        }
        let horizon = c.lookahead_horizon();
        let experts = slice(experts, known * k, "experts")?;
        let given = layers_of(p, experts, known)?;
        let x = slice(router_input, input_len, "router_input")?;
        let out = slice_mut(out, horizon * budget as usize, "out")?;
        let f = s
            .online
            .predict_lookahead_with_input(token, &given, (!x.is_empty()).then_some(x))
            .or_else(|e| fail(MC_ERR_PREDICT, e.to_string()))?;
        out.copy_from_slice(&f.top_rows(budget as usize, horizon));
        Ok(())
    })
}

/// The token's full routing, `experts[n_moe_layers * top_k]` (each layer's routed
/// experts); advances the session to the next token.
///
/// # Safety
/// `s` is a live session; `experts` holds `n_moe_layers * top_k` values.
#[no_mangle]
pub unsafe extern "C" fn mc_session_observe(
    s: *mut mc_session,
    token: u32,
    experts: *const u16,
) -> c_int {
    guard(|| {
        let s = non_null_mut(s, "s")?;
        let r = s.online.predictor().card.config.routing;
        let experts = slice(experts, r.n_moe * r.top_k, "experts")?;
        let layers: Vec<Option<&[u16]>> = layers_of(s.online.predictor(), experts, r.n_moe)?
            .into_iter()
            .map(Some)
            .collect();
        s.online
            .observe(token, &layers)
            .or_else(|e| fail(MC_ERR_PREDICT, e.to_string()))
    })
}
