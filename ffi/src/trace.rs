//! Recorded routing through the C ABI: a runtime replays a moecast trace (each layer's
//! experts forced to the recorded ones, as `llamacpp/moecast_prefetch.c -p` does) without
//! parsing its format.

use std::ffi::{c_char, c_int};
use std::path::Path;

use datasets::{NOT_COMPUTED, UNKNOWN_TOKEN};

use crate::{
    c_str, fail, free_box, guard, non_null, non_null_mut, slice_mut, write_shape, Failure,
    MC_ERR_ARG, MC_ERR_OPEN,
};

/// A trace's sequences, in trace order (immutable; shareable across threads).
pub struct mc_trace {
    n_moe: usize,
    n_experts: usize,
    top_k: usize,
    /// Per sequence: token ids, and `tokens x n_moe x top_k` experts.
    sequences: Vec<(Vec<u32>, Vec<u16>)>,
    /// Per sequence, its first token's row in the trace.
    starts: Vec<usize>,
    /// The trace itself, kept where it records router inputs (read a vector at a time:
    /// a mapped trace's stay on disk until asked for).
    opened: Option<datasets::OpenedTrace>,
}

impl mc_trace {
    /// Sequence `s`: its token ids and `tokens x n_moe x top_k` experts.
    fn sequence(&self, s: u32) -> Result<&(Vec<u32>, Vec<u16>), Failure> {
        match self.sequences.get(s as usize) {
            Some(seq) => Ok(seq),
            None => fail(
                MC_ERR_ARG,
                format!("sequence {s} is outside 0..{}", self.sequences.len()),
            ),
        }
    }

    /// The router inputs' width (0: the trace records none).
    fn input_dim(&self) -> usize {
        let dim = self
            .opened
            .as_ref()
            .and_then(|o| o.view().meta.router_input_dim());
        dim.unwrap_or(0) as usize
    }
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
        let inputs =
            v.router_inputs().is_some() && v.meta.router_input_dim().is_some_and(|d| d > 0);
        let (mut sequences, mut starts) = (Vec::new(), Vec::new());
        for r in v.sequence_ranges() {
            let end = r.clone().find(|t| !whole(t)).unwrap_or(r.end);
            sequences.push((
                v.token[r.start..end].to_vec(),
                v.experts[r.start * width..end * width].to_vec(),
            ));
            starts.push(r.start);
        }
        let n_experts = v.meta.n_experts as usize;
        *out = Box::into_raw(Box::new(mc_trace {
            n_moe,
            n_experts,
            top_k,
            sequences,
            starts,
            opened: inputs.then_some(opened),
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
        let (ids, routed) = t.sequence(s)?;
        *non_null_mut(n_tokens, "n_tokens")? = ids.len() as u32;
        *non_null_mut(tokens, "tokens")? = ids.as_ptr();
        *non_null_mut(experts, "experts")? = routed.as_ptr();
        Ok(())
    })
}

/// The width of the router inputs the trace records (0 when it records none).
///
/// # Safety
/// `t` is a live trace; `dim` is writable.
#[no_mangle]
pub unsafe extern "C" fn mc_trace_router_input_dim(t: *const mc_trace, dim: *mut u32) -> c_int {
    guard(|| {
        let t = non_null(t, "t")?;
        *non_null_mut(dim, "dim")? = t.input_dim() as u32;
        Ok(())
    })
}

/// The router input that MoE layer `layer` read at token `pos` of sequence `s`, as
/// recorded, written to `out[len]` (`len` = `mc_trace_router_input_dim`): what a
/// predictor that reads router inputs is given when the trace is replayed.
///
/// # Safety
/// `t` is a live trace; `out` has room for `len` values.
#[no_mangle]
pub unsafe extern "C" fn mc_trace_router_input(
    t: *const mc_trace,
    s: u32,
    pos: u32,
    layer: u32,
    out: *mut f32,
    len: usize,
) -> c_int {
    guard(|| {
        let t = non_null(t, "t")?;
        let dim = t.input_dim();
        if dim == 0 {
            return fail(MC_ERR_ARG, "the trace records no router inputs");
        }
        if len != dim {
            return fail(
                MC_ERR_ARG,
                format!("len is {len}; the trace's router inputs are {dim} wide"),
            );
        }
        let (ids, _) = t.sequence(s)?;
        if pos as usize >= ids.len() || layer as usize >= t.n_moe {
            return fail(
                MC_ERR_ARG,
                format!(
                    "token {pos}, MoE layer {layer} is outside sequence {s}'s {} tokens x {} layers",
                    ids.len(),
                    t.n_moe
                ),
            );
        }
        let out = slice_mut(out, len, "out")?;
        let row = t.starts[s as usize] + pos as usize;
        let x = t
            .opened
            .as_ref()
            .and_then(|o| o.view().router_input(row, layer as usize));
        let Some(x) = x else {
            return fail(
                MC_ERR_ARG,
                format!("token {pos} of sequence {s} has no router input at MoE layer {layer}"),
            );
        };
        for (o, &bits) in out.iter_mut().zip(x) {
            *o = half::f16::from_bits(bits).to_f32();
        }
        Ok(())
    })
}
