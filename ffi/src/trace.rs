//! Recorded routing through the C ABI: a runtime replays a moecast trace (each layer's
//! experts forced to the recorded ones, as `llamacpp/moecast_prefetch.c -p` does) without
//! parsing its format.

use std::ffi::{c_char, c_int};
use std::path::Path;

use datasets::{NOT_COMPUTED, UNKNOWN_TOKEN};

use crate::{
    c_str, fail, free_box, guard, non_null, non_null_mut, write_shape, MC_ERR_ARG, MC_ERR_OPEN,
};

/// A trace's sequences, in trace order (immutable; shareable across threads).
pub struct mc_trace {
    n_moe: usize,
    n_experts: usize,
    top_k: usize,
    /// Per sequence: token ids, and `tokens x n_moe x top_k` experts.
    sequences: Vec<(Vec<u32>, Vec<u16>)>,
}

const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<mc_trace>();
};

/// Reads the trace at `path` (any format `moecast trace` reads) into `*out`: its
/// sequences in trace order, each in position order (as traces store them) and cut at
/// its first token without an id or without every layer's routing.
///
/// # Safety
/// `path` is a NUL-terminated path; `out` points to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn mc_trace_open(path: *const c_char, out: *mut *mut mc_trace) -> c_int {
    guard(|| {
        let out = non_null_mut(out, "out")?;
        let path = c_str(path, "path")?;
        let opened =
            datasets::open_trace(Path::new(path)).or_else(|e| fail(MC_ERR_OPEN, e.to_string()))?;
        let v = opened.view();
        let (n_moe, top_k) = (v.meta.n_moe(), v.meta.top_k as usize);
        let width = n_moe * top_k;
        let whole = |t: &usize| {
            let routed = &v.experts[t * width..(t + 1) * width];
            v.token[*t] != UNKNOWN_TOKEN && !routed.contains(&NOT_COMPUTED)
        };
        let sequences = v
            .sequence_ranges()
            .into_iter()
            .map(|r| {
                let end = r.clone().find(|t| !whole(t)).unwrap_or(r.end);
                (
                    v.token[r.start..end].to_vec(),
                    v.experts[r.start * width..end * width].to_vec(),
                )
            })
            .collect();
        *out = Box::into_raw(Box::new(mc_trace {
            n_moe,
            n_experts: v.meta.n_experts as usize,
            top_k,
            sequences,
        }));
        Ok(())
    })
}

/// Frees a trace (null is ignored).
///
/// # Safety
/// `t` comes from `mc_trace_open` and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn mc_trace_free(t: *mut mc_trace) {
    // SAFETY: `t` was made by `mc_trace_open` (documented).
    unsafe { free_box(t) }
}

/// The trace's MoE layers, experts per layer, top-k and sequences.
///
/// # Safety
/// `t` is a live trace; the out pointers are writable.
#[no_mangle]
pub unsafe extern "C" fn mc_trace_shape(
    t: *const mc_trace,
    n_moe_layers: *mut u32,
    n_experts: *mut u32,
    top_k: *mut u32,
    n_sequences: *mut u32,
) -> c_int {
    guard(|| {
        let t = non_null(t, "t")?;
        write_shape([
            (n_moe_layers, t.n_moe, "n_moe_layers"),
            (n_experts, t.n_experts, "n_experts"),
            (top_k, t.top_k, "top_k"),
            (n_sequences, t.sequences.len(), "n_sequences"),
        ])
    })
}

/// Sequence `s`: `*n_tokens` tokens, their ids at `*tokens` and their experts at
/// `*experts` (`n_tokens x n_moe_layers x top_k`), both owned by the trace (valid until
/// `mc_trace_free`).
///
/// # Safety
/// `t` is a live trace; the out pointers are writable.
#[no_mangle]
pub unsafe extern "C" fn mc_trace_sequence(
    t: *const mc_trace,
    s: u32,
    n_tokens: *mut u32,
    tokens: *mut *const u32,
    experts: *mut *const u16,
) -> c_int {
    guard(|| {
        let t = non_null(t, "t")?;
        let Some((ids, routed)) = t.sequences.get(s as usize) else {
            return fail(
                MC_ERR_ARG,
                format!("sequence {s} is outside 0..{}", t.sequences.len()),
            );
        };
        *non_null_mut(n_tokens, "n_tokens")? = ids.len() as u32;
        *non_null_mut(tokens, "tokens")? = ids.as_ptr();
        *non_null_mut(experts, "experts")? = routed.as_ptr();
        Ok(())
    })
}
