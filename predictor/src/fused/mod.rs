//! Fused SiLU, attention softmax and LayerNorm with hand-written backward passes, for
//! burn-flex.
//!
//! Burn's autodiff builds SiLU from a sigmoid and a product, softmax from max, exp, sum
//! and division, and LayerNorm from about nine operations; each is a kernel over the
//! whole tensor (with scalar `expf`), and the backward passes run as many again, `exp`
//! included. On the predictor's training step these were about a quarter of the time.
//! Here each is one pass forward and one or two backward, with a vectorised `exp`
//! (`kernels.rs`), through Burn's backend-extension mechanism: [`FusedOps`] for `Flex`
//! and for its `Autodiff` (`autodiff.rs`). Other backends (wgpu, CUDA) keep Burn's own
//! operations: [`silu`], [`attention`] and [`layer_norm`] choose.

mod autodiff;
mod kernels;
#[cfg(test)]
mod tests;

use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch, DispatchDevice};
use burn::nn::LayerNorm;
use burn::tensor::{Device, Tensor};

/// Epsilon of the predictor's LayerNorms (Burn's default), which [`layer_norm`] uses.
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// Operations the predictor fuses on the CPU.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// `x · σ(x)`.
    fn fused_silu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The gradient of SiLU at `x`: `g · σ(x) (1 + x (1 − σ(x)))`.
    fn fused_silu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `softmax(x + bias)` over the last dimension; `bias` is a constant whose element
    /// count divides `x`'s, repeated over `x`'s leading rows (an ALiBi bias of
    /// `[1, heads, s, s_kv]` for scores of `[b, heads, s, s_kv]`).
    fn fused_softmax_bias(x: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The gradient of softmax given its output `p`: `p ⊙ (g − Σ_row g ⊙ p)`.
    fn fused_softmax_backward(p: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// LayerNorm over the last dimension: `(x − μ) / √(σ² + ε) · γ + β`.
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;
    /// Its gradient with respect to `x`, given `grad`:
    /// `(γg − mean(γg) − x̂ · mean(γg ⊙ x̂)) / √(σ² + ε)` per row.
    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;
    /// Its gradient with respect to `γ`: `Σ_rows grad ⊙ x̂`, `[d]`.
    fn fused_layer_norm_gamma_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;
}

/// Whether `device` (autodiff or not) runs on burn-flex, where [`FusedOps`] exist.
pub fn fused_on(device: &Device) -> bool {
    let inner = device.clone().without_autodiff();
    matches!(inner.as_dispatch(), DispatchDevice::Flex(_))
}

/// SiLU, fused on burn-flex.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !fused_on(&x.device()) {
        return burn::tensor::activation::silu(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_silu(x.into_dispatch()))
}

/// `softmax(x + bias)` over the last dimension (`bias` a constant, see
/// [`FusedOps::fused_softmax_bias`]), fused on burn-flex.
pub fn softmax_with_bias(x: Tensor<4>, bias: Tensor<4>) -> Tensor<4> {
    if !fused_on(&x.device()) {
        let dims = x.dims();
        return burn::tensor::activation::softmax(x + bias.expand(dims), 3);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_softmax_bias(
        x.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// Scaled dot-product attention of `q`, `k`, `v` (`[b, heads, s, head_dim]`, keys and
/// values `s_kv` long) with an additive constant `bias` of `[1, heads, s, s_kv]`
/// (`-inf` masks a key): the fused softmax on burn-flex, Burn's `attention` elsewhere.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<4>) -> Tensor<4> {
    if !fused_on(&q.device()) {
        let [b, h, s, _] = q.dims();
        let s_kv = k.dims()[2];
        return burn::tensor::module::attention(
            q,
            k,
            v,
            None,
            Some(bias.expand([b, h, s, s_kv])),
            burn::tensor::ops::AttentionModuleOptions::default(),
        );
    }
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    let scores = (q * scale).matmul(k.swap_dims(2, 3));
    softmax_with_bias(scores, bias).matmul(v)
}

/// `norm.forward(x)`, fused on burn-flex (the norm must have a bias and
/// [`LAYER_NORM_EPS`]).
pub fn layer_norm<const D: usize>(norm: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
    match &norm.beta {
        Some(beta) if fused_on(&x.device()) => {
            Tensor::from_dispatch(<Dispatch as FusedOps>::fused_layer_norm(
                x.into_dispatch(),
                norm.gamma.val().into_dispatch(),
                beta.val().into_dispatch(),
                LAYER_NORM_EPS,
            ))
        }
        _ => norm.forward(x),
    }
}
