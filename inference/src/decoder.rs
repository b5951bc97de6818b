//! The decoder layer every architecture here shares: pre-norm attention, then a pre-norm
//! feed-forward (a dense SwiGLU or a sparse MoE block), each added to the residual
//! stream. Only the attention differs between families, so each model file defines its
//! attention and passes it in.

use burn::tensor::Tensor;

use crate::error::Result;
use crate::layers::RmsNorm;
use crate::moe::FeedForward;
use crate::routing::RoutingObserver;

/// `x + attention(input_norm(x))`, then `h + ffn(post_norm(h))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer<A> {
    /// `input_layernorm`.
    pub input_norm: RmsNorm,
    /// The family's attention block, output projection included.
    pub attention: A,
    /// `post_attention_layernorm`: the norm the feed-forward (and its router) reads.
    pub post_norm: RmsNorm,
    pub ffn: FeedForward,
}

impl<A> DecoderLayer<A> {
    /// Runs the layer on `x` (`[T, hidden]` at positions `first_pos..`); `attend` computes
    /// the attention block's output from the normalised input. A MoE block reports its
    /// routing (and, when asked for, the pre-attention gate's logits) to `observer`.
    pub fn forward(
        &self,
        x: Tensor<2>,
        first_pos: usize,
        observer: &mut dyn RoutingObserver,
        attend: impl FnOnce(&A, Tensor<2>) -> Tensor<2>,
    ) -> Result<Tensor<2>> {
        if observer.wants_pre_attention_logits() {
            if let Some(moe) = self.ffn.sparse() {
                moe.report_pre_attention(self.post_norm.forward(x.clone()), first_pos, observer);
            }
        }
        let h = x.clone() + attend(&self.attention, self.input_norm.forward(x));
        let f = self
            .ffn
            .forward(self.post_norm.forward(h.clone()), first_pos, observer)?;
        Ok(h + f)
    }
}
