//! The fused operations on burn-flex: branch-free loops over rows that vectorise (AVX2 +
//! FMA when the CPU has them), one thread each.

use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::ops::ModuleOps;
use burn::backend::{Flex, TensorMetadata};
use burn::tensor::{Bytes, DType};

use super::FusedOps;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 · 2^23`: adding it rounds an `f32` of magnitude below `2^22` to an integer.
const ROUNDER: f32 = 12_582_912.0;

/// `e^x` to about 2 ulp (Cephes' polynomial), branch-free so that loops over it
/// vectorise; 0 below -87.3, capped at `e^88.7`.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + ROUNDER;
    let n = t - ROUNDER;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale =
        f32::from_bits(((t.to_bits() as i32 - ROUNDER.to_bits() as i32 + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Runs `body` compiled for AVX2 + FMA when the CPU has them (the loops inside
/// vectorise 8 wide), else for the baseline.
macro_rules! with_simd {
    ($name:ident ( $($arg:ident : $ty:ty),* ) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features were detected just above.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body
        }
    };
}

with_simd!(silu_rows(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * sigmoid(v);
    }
});

with_simd!(silu_grad_rows(x: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &v), &d) in out.iter_mut().zip(x).zip(g) {
        let s = sigmoid(v);
        *o = d * s * (1.0 + v * (1.0 - s));
    }
});

with_simd!(softmax_row(x: &[f32], bias: &[f32], out: &mut [f32]) {
    for (o, (&v, &b)) in out.iter_mut().zip(x.iter().zip(bias)) {
        *o = v + b;
    }
    let max = lanes(out, f32::NEG_INFINITY, |m, v| m.max(v), f32::max);
    if max == f32::NEG_INFINITY {
        out.iter_mut().for_each(|o| *o = 0.0);
        return;
    }
    for o in out.iter_mut() {
        *o = exp(*o - max);
    }
    let inv = 1.0 / lanes(out, 0.0, |s, v| s + v, |a, b| a + b);
    for o in out.iter_mut() {
        *o *= inv;
    }
});

with_simd!(softmax_grad_row(p: &[f32], g: &[f32], out: &mut [f32]) {
    let dot = lanes_zip(p, g, |a, b| a * b);
    for ((o, &a), &b) in out.iter_mut().zip(p).zip(g) {
        *o = a * (b - dot);
    }
});

with_simd!(layer_norm_grad_row(x: &[f32], gamma: &[f32], g: &[f32], eps: f32, out: &mut [f32]) {
    let (mean, inv) = moments(x, eps);
    let n = x.len() as f32;
    // `out` holds γg until the last pass.
    for ((o, &w), &d) in out.iter_mut().zip(gamma).zip(g) {
        *o = w * d;
    }
    let a = lanes(out, 0.0, |s, v| s + v, |p, q| p + q) / n;
    let b = lanes_zip(out, x, |gy, v| gy * (v - mean)) * inv / n;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = inv * (*o - a - (v - mean) * inv * b);
    }
});

with_simd!(layer_norm_gamma_row(x: &[f32], g: &[f32], eps: f32, acc: &mut [f32]) {
    let (mean, inv) = moments(x, eps);
    for ((s, &v), &d) in acc.iter_mut().zip(x).zip(g) {
        *s += d * (v - mean) * inv;
    }
});

/// Mean and `1 / √(σ² + ε)` of a row (the population variance, as Burn's LayerNorm).
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lanes(x, 0.0, |s, v| s + v, |a, b| a + b) / n;
    let var = lanes(x, 0.0, |s, v| s + (v - mean) * (v - mean), |a, b| a + b) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Width of the reductions below.
const LANES: usize = 16;

/// `x` folded by `step` in [`LANES`] independent accumulators, then combined: a
/// reduction the compiler vectorises (one running value is a chain of dependent
/// operations, 4 cycles per element).
#[inline(always)]
fn lanes(
    x: &[f32],
    init: f32,
    step: impl Fn(f32, f32) -> f32,
    join: impl Fn(f32, f32) -> f32,
) -> f32 {
    let mut acc = [init; LANES];
    let mut tail = x.chunks_exact(LANES);
    for c in &mut tail {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = step(*a, v);
        }
    }
    let rest = tail.remainder().iter().fold(init, |a, &v| step(a, v));
    acc.into_iter().fold(rest, join)
}

/// `Σ f(a_i, b_i)` in [`LANES`] independent accumulators.
#[inline(always)]
fn lanes_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *s += f(u, v);
        }
    }
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&u, &v)| f(u, v))
        .sum();
    acc.iter().sum::<f32>() + rest
}

/// Elements per call of the vectorised loops (SiLU).
const CHUNK: usize = 1 << 14;

/// A contiguous `f32` copy of `t`'s values (a view of its storage when it is one).
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    assert_eq!(t.dtype(), DType::F32, "fused ops run on f32");
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("a contiguous tensor is one slice")
                .to_vec(),
        ),
    }
}

fn output(shape: burn::tensor::Shape, data: Vec<f32>) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// `f` over rows of `width` of `a` (and `b`), into a new tensor of `a`'s shape. One
/// thread: the training step already runs one shard per thread (see [`crate::step`]),
/// and splitting these loops over rayon as well measured a third slower.
fn map_rows(
    a: &FlexTensor,
    b: Option<&FlexTensor>,
    width: usize,
    f: impl Fn(usize, &[f32], &[f32], &mut [f32]),
) -> FlexTensor {
    let xa = values(a);
    let xb = b.map(values);
    let xb: &[f32] = xb.as_deref().unwrap_or(&[]);
    let mut out = vec![0f32; xa.len()];
    for (r, row) in out.chunks_mut(width.max(1)).enumerate() {
        let (at, w) = (r * width, row.len());
        let other = if xb.is_empty() {
            &[][..]
        } else {
            &xb[at..at + w]
        };
        f(r, &xa[at..at + w], other, row);
    }
    output(a.shape(), out)
}

impl FusedOps for Flex {
    fn fused_silu(x: FlexTensor) -> FlexTensor {
        map_rows(&x, None, CHUNK, |_, v, _, o| silu_rows(v, o))
    }

    fn fused_silu_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        map_rows(&x, Some(&grad), CHUNK, |_, v, g, o| silu_grad_rows(v, g, o))
    }

    fn fused_softmax_bias(x: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let shape = x.shape();
        let width = shape[shape.num_dims() - 1];
        let bias = values(&bias).into_owned();
        assert!(
            !bias.is_empty() && x.shape().num_elements().is_multiple_of(bias.len()),
            "softmax bias of {} values for scores of {:?}",
            bias.len(),
            shape
        );
        let bias_rows = bias.len() / width;
        map_rows(&x, None, width, |row, v, _, o| {
            let b = (row % bias_rows) * width;
            softmax_row(v, &bias[b..b + width], o)
        })
    }

    fn fused_layer_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
    ) -> FlexTensor {
        <Flex as ModuleOps<Flex>>::layer_norm(x, gamma, Some(beta), eps)
    }

    fn fused_layer_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        grad: FlexTensor,
        eps: f64,
    ) -> FlexTensor {
        let gamma = values(&gamma).into_owned();
        map_rows(&x, Some(&grad), gamma.len(), |_, v, g, o| {
            layer_norm_grad_row(v, &gamma, g, eps as f32, o)
        })
    }

    fn fused_layer_norm_gamma_grad(x: FlexTensor, grad: FlexTensor, eps: f64) -> FlexTensor {
        let shape = x.shape();
        let d = shape[shape.num_dims() - 1];
        let (xv, gv) = (values(&x), values(&grad));
        let mut acc = vec![0f32; d];
        for (v, g) in xv.chunks(d).zip(gv.chunks(d)) {
            layer_norm_gamma_row(v, g, eps as f32, &mut acc);
        }
        output([d].into(), acc)
    }

    fn fused_softmax_backward(p: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let shape = p.shape();
        let width = shape[shape.num_dims() - 1];
        map_rows(&p, Some(&grad), width, |_, a, g, o| {
            softmax_grad_row(a, g, o)
        })
    }
}
