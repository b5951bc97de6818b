//! [`FusedOps`] under autodiff: each operation registers its hand-written backward
//! pass, which calls the inner backend's kernels.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, TensorMetadata};
use burn::tensor::Shape;

use super::FusedOps;

/// The backward pass of SiLU (from its input) or softmax (from its output): one kernel
/// of the saved tensor and the incoming gradient.
#[derive(Debug)]
enum UnaryBackward {
    Silu,
    Softmax,
}

impl<B: Backend + FusedOps> Backward<B, 1> for UnaryBackward {
    /// SiLU's input or softmax's output.
    type State = B::FloatTensorPrimitive;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let saved = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |g| match self {
            UnaryBackward::Silu => B::fused_silu_backward(saved, g),
            UnaryBackward::Softmax => B::fused_softmax_backward(saved, g),
        });
    }
}

#[derive(Debug)]
struct LayerNormBackward;

impl<B: Backend + FusedOps> Backward<B, 3> for LayerNormBackward {
    /// The input, γ and ε.
    type State = (B::FloatTensorPrimitive, B::FloatTensorPrimitive, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gamma, eps) = ops.state;
        let [input, scale, shift] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let shape = grad.shape();
        let d = shape[shape.num_dims() - 1];
        if let Some(node) = shift {
            let rows = B::float_reshape(grad.clone(), Shape::new([shape.num_elements() / d, d]));
            let sum = B::float_reshape(B::float_sum_dim(rows, 0), Shape::new([d]));
            grads.register::<B>(node.id, sum);
        }
        if let Some(node) = scale {
            let g = B::fused_layer_norm_gamma_grad(x.clone(), grad.clone(), eps);
            grads.register::<B>(node.id, g);
        }
        if let Some(node) = input {
            grads.register::<B>(node.id, B::fused_layer_norm_backward(x, gamma, grad, eps));
        }
    }
}

impl<B: Backend + FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn fused_silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match UnaryBackward::Silu
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let input = x.primitive().clone();
                prep.finish(input.clone(), B::fused_silu(input))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_silu(x.into_primitive())),
        }
    }

    fn fused_silu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        // Not differentiated again: the result is a constant of the graph.
        let out = B::fused_silu_backward(x.into_primitive(), grad.into_primitive());
        Self::from_inner(out)
    }

    fn fused_softmax_bias(x: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        let bias = bias.into_primitive();
        match UnaryBackward::Softmax
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let p = B::fused_softmax_bias(x.into_primitive(), bias);
                prep.finish(p.clone(), p)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::fused_softmax_bias(x.into_primitive(), bias))
            }
        }
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let prep = LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let (x, gamma, beta) = (
            x.into_primitive(),
            gamma.into_primitive(),
            beta.into_primitive(),
        );
        match prep {
            OpsKind::Tracked(prep) => {
                let state = (x.clone(), gamma.clone(), epsilon);
                prep.finish(state, B::fused_layer_norm(x, gamma, beta, epsilon))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_layer_norm(x, gamma, beta, epsilon)),
        }
    }

    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let (x, gamma, grad) = (
            x.into_primitive(),
            gamma.into_primitive(),
            grad.into_primitive(),
        );
        Self::from_inner(B::fused_layer_norm_backward(x, gamma, grad, epsilon))
    }

    fn fused_layer_norm_gamma_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let out =
            B::fused_layer_norm_gamma_grad(x.into_primitive(), grad.into_primitive(), epsilon);
        Self::from_inner(out)
    }

    fn fused_softmax_backward(p: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = B::fused_softmax_backward(p.into_primitive(), grad.into_primitive());
        Self::from_inner(out)
    }
}
