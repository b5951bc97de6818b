//! What every architecture here shares: the decoder layer (pre-norm attention, then a
//! pre-norm feed-forward, a dense SwiGLU or a sparse MoE block, each added to the
//! residual stream) and the stack around the layers (token embedding, final norm, LM
//! head). Only the attention differs between families, so each model file passes its
//! attention in: [`crate::attention::GroupedQueryAttention`] for the Llama-style
//! families and GPT-OSS, DeepSeek's latent attention its own.

use burn::tensor::{Device, Tensor, TensorData};

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::layers::{embed_tokens, Dense, RmsNorm};
use crate::models::LensParts;
use crate::moe::{FeedForward, SparseMoe};
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

/// The `config.json` sizes the stack's own tensors are read with.
#[derive(Debug, Clone, Copy)]
pub struct StackConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
}

/// A family's model around its attention: `model.embed_tokens`, the decoder layers
/// `model.layers.{l}`, `model.norm` and the LM head.
#[derive(Debug, Clone)]
pub struct DecoderStack<A> {
    /// `model.embed_tokens`, `[vocab, hidden]`.
    pub embed: Tensor<2>,
    /// `model.layers.{l}`, in order.
    pub layers: Vec<DecoderLayer<A>>,
    /// `model.norm`, before the LM head.
    pub norm: RmsNorm,
    /// `lm_head`, or the embedding where `tie_word_embeddings` says so.
    pub lm_head: Dense,
}

impl<A> DecoderStack<A> {
    /// Loads the stack from `ck` onto `device`; `layer(l, prefix)` loads layer `l`'s
    /// attention and feed-forward (`prefix`: `model.layers.{l}`), the stack its norms.
    pub fn load(
        ck: &Checkpoint,
        c: StackConfig,
        device: &Device,
        mut layer: impl FnMut(usize, &str) -> Result<(A, FeedForward)>,
    ) -> Result<Self> {
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let emb = ck.tensor_f32("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let embed = Tensor::<2>::from_data(TensorData::new(emb, [c.vocab_size, h]), device);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let (attention, ffn) = layer(l, &p)?;
            let norm = |name: &str| RmsNorm::load(ck, &format!("{p}.{name}"), h, eps, device);
            layers.push(DecoderLayer {
                input_norm: norm("input_layernorm")?,
                attention,
                post_norm: norm("post_attention_layernorm")?,
                ffn,
            });
        }
        let lm_head = Dense::load_lm_head(ck, &embed, c.tie_word_embeddings, device)?;
        Ok(DecoderStack {
            norm: RmsNorm::load(ck, "model.norm", h, eps, device)?,
            embed,
            layers,
            lm_head,
        })
    }

    /// Embeds `tokens` (at positions `first_pos..`), runs every layer with `attend(l,
    /// attention, normalised input)` as layer `l`'s attention, and returns the logits
    /// `[T, vocab]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        first_pos: usize,
        observer: &mut dyn RoutingObserver,
        mut attend: impl FnMut(usize, &A, Tensor<2>) -> Tensor<2>,
    ) -> Result<Tensor<2>> {
        let mut x = embed_tokens(&self.embed, tokens);
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, first_pos, observer, |a, n| attend(l, a, n))?;
        }
        Ok(self.lm_head.forward(self.norm.forward(x)))
    }

    /// The device the weights are on.
    pub fn device(&self) -> Device {
        self.embed.device()
    }

    /// Model layer indices that have sparse MoE blocks.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.layers.len())
            .filter(|&l| self.layers[l].ffn.sparse().is_some())
            .collect()
    }

    /// The sparse MoE blocks, in layer order.
    pub fn sparse_layers_mut(&mut self) -> Vec<&mut SparseMoe> {
        self.layers
            .iter_mut()
            .filter_map(|l| l.ffn.sparse_mut())
            .collect()
    }

    /// The weights the logit lens reads.
    pub fn lens_parts(&self) -> LensParts<'_> {
        LensParts::new(
            &self.embed,
            &self.norm,
            &self.lm_head,
            self.layers.iter().map(|l| (&l.post_norm, l.ffn.sparse())),
        )
    }
}
