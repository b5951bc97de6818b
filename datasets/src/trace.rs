//! The routing-trace data model.
//!
//! A trace is a sequence of tokens; each token has, for every MoE layer of the model,
//! the router's top-k expert ids (in rank order when the source records it) and their
//! router weights when known, or "not computed". In memory and on disk the routing is
//! stored column-wise: one flat `u16` array of `n_tokens x n_moe_layers x top_k` expert
//! ids and a parallel `f32` array of weights, so any token's routing is a slice.

pub use crate::builder::TraceBuilder;
use crate::channel::{ChannelColumns, ChannelSlice, ChannelValues, ROUTER_INPUTS, ROUTER_LOGITS};
use crate::error::{Result, TraceError};
pub use crate::meta::TraceMeta;
pub use crate::record::{Phase, TokenRecord};

/// Expert id marking a layer that was not computed for a token (all `k` slots hold it).
pub const NOT_COMPUTED: u16 = u16::MAX;
/// Token id marking an unknown token.
pub const UNKNOWN_TOKEN: u32 = u32::MAX;

/// A borrowed, column-wise view of a trace: what every algorithm reads. Both the
/// in-memory [`RoutingTrace`] and the memory-mapped [`crate::MappedTrace`] hand it out
/// without copying.
#[derive(Debug, Clone, Copy)]
pub struct TraceView<'a> {
    pub meta: &'a TraceMeta,
    /// Sequence names, indexed by `seq`.
    pub seq_names: &'a [String],
    /// Sequence index of each token.
    pub seq: &'a [u32],
    /// Position of each token in its sequence.
    pub pos: &'a [u32],
    /// Token id of each token ([`UNKNOWN_TOKEN`] when unknown).
    pub token: &'a [u32],
    /// [`Phase::code`] of each token.
    pub phase: &'a [u8],
    /// `n_tokens x n_moe x top_k` expert ids ([`NOT_COMPUTED`] for missing layers).
    pub experts: &'a [u16],
    /// Router weights parallel to `experts` (NaN where unknown), if the trace has any.
    pub weights: Option<&'a [f32]>,
    /// The channel columns (`n_tokens x n_moe x width` each), in the order of
    /// `meta.channels`.
    pub channels: ChannelColumns<'a>,
}

impl<'a> TraceView<'a> {
    /// Number of tokens.
    pub fn n_tokens(&self) -> usize {
        self.seq.len()
    }

    /// Top-k ids of token `t` at MoE layer index `m`, or `None` when not computed.
    #[inline]
    pub fn layer(&self, t: usize, m: usize) -> Option<&'a [u16]> {
        let k = self.meta.top_k as usize;
        let start = (t * self.meta.n_moe() + m) * k;
        let ids = &self.experts[start..start + k];
        (ids[0] != NOT_COMPUTED).then_some(ids)
    }

    /// Router weights of token `t` at MoE layer index `m`, when recorded.
    pub fn layer_weights(&self, t: usize, m: usize) -> Option<&'a [f32]> {
        let k = self.meta.top_k as usize;
        let start = (t * self.meta.n_moe() + m) * k;
        let w = &self.weights?[start..start + k];
        (!w[0].is_nan()).then_some(w)
    }

    /// Channel `c`'s values (`meta.channels[c]`) of token `t` at MoE layer index `m`,
    /// when stored and the layer was computed.
    pub fn channel(&self, c: usize, t: usize, m: usize) -> Option<ChannelSlice<'a>> {
        self.layer(t, m)?;
        let w = self.meta.channels.get(c)?.width as usize;
        let start = (t * self.meta.n_moe() + m) * w;
        Some(self.channels.get(c)?.slice(start..start + w))
    }

    /// The whole column of channel `name`, when the trace carries it.
    pub fn channel_column(&self, name: &str) -> Option<ChannelSlice<'a>> {
        self.channels.get(self.meta.channel_index(name)?)
    }

    /// Channel `name`'s values of token `t` at MoE layer index `m` as f32.
    pub fn channel_f32(&self, name: &str, t: usize, m: usize) -> Option<Vec<f32>> {
        self.channel(self.meta.channel_index(name)?, t, m)
            .map(|v| v.to_f32())
    }

    /// The router-input column (f16 bits, `n_tokens x n_moe x router_input_dim`).
    pub fn router_inputs(&self) -> Option<&'a [u16]> {
        self.channel_column(ROUTER_INPUTS)?.as_f16()
    }

    /// The router input of token `t` at MoE layer index `m` (f16 bits), when recorded
    /// and the layer was computed.
    pub fn router_input(&self, t: usize, m: usize) -> Option<&'a [u16]> {
        self.channel(self.meta.channel_index(ROUTER_INPUTS)?, t, m)?
            .as_f16()
    }

    /// [`TraceView::router_input`] as f32 values.
    pub fn router_input_f32(&self, t: usize, m: usize) -> Option<Vec<f32>> {
        self.channel_f32(ROUTER_INPUTS, t, m)
    }

    /// The router logits of token `t` at MoE layer index `m`, when recorded and computed.
    pub fn router_logits(&self, t: usize, m: usize) -> Option<&'a [f32]> {
        self.channel(self.meta.channel_index(ROUTER_LOGITS)?, t, m)?
            .as_f32()
    }

    /// The tokens `range` as a view of their own (sequence names stay shared).
    pub fn tokens(&self, range: std::ops::Range<usize>) -> TraceView<'a> {
        let n_moe = self.meta.n_moe();
        let per_token = |w: usize| range.start * n_moe * w..range.end * n_moe * w;
        let k = self.meta.top_k as usize;
        TraceView {
            meta: self.meta,
            seq_names: self.seq_names,
            seq: &self.seq[range.clone()],
            pos: &self.pos[range.clone()],
            token: &self.token[range.clone()],
            phase: &self.phase[range.clone()],
            experts: &self.experts[per_token(k)],
            weights: self.weights.map(|w| &w[per_token(k)]),
            channels: self.channels.map(|c, x| {
                x.slice(per_token(
                    self.meta.channels.get(c).map_or(0, |ch| ch.width) as usize,
                ))
            }),
        }
    }

    /// Token ranges `[start, end)` of each sequence, in trace order.
    pub fn sequence_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut start = 0;
        for t in 1..=self.seq.len() {
            if t == self.seq.len() || self.seq[t] != self.seq[start] {
                out.push(start..t);
                start = t;
            }
        }
        out
    }

    /// The owned record of token `t`.
    pub fn record(&self, t: usize) -> TokenRecord {
        let n_moe = self.meta.n_moe();
        let experts = (0..n_moe)
            .map(|m| {
                self.layer(t, m)
                    .map(|ids| ids.iter().map(|&e| e as u32).collect())
            })
            .collect();
        let weights = self.weights.map(|_| {
            (0..n_moe)
                .map(|m| self.layer_weights(t, m).map(|w| w.to_vec()))
                .collect()
        });
        let channels = (0..self.meta.channels.len())
            .filter(|&c| self.channels.get(c).is_some())
            .map(|c| {
                let values = (0..n_moe)
                    .map(|m| self.channel(c, t, m).map(|v| v.to_f32()))
                    .collect();
                (self.meta.channels[c].name.clone(), values)
            })
            .collect();
        TokenRecord {
            seq: self.seq_names[self.seq[t] as usize].clone(),
            pos: self.pos[t],
            phase: Phase::from_code(self.phase[t]).unwrap_or(Phase::Decode),
            token: (self.token[t] != UNKNOWN_TOKEN).then_some(self.token[t]),
            experts,
            weights,
            channels,
        }
    }

    /// Copies the view into an owned trace.
    pub fn to_owned_trace(&self) -> RoutingTrace {
        RoutingTrace {
            meta: self.meta.clone(),
            seq_names: self.seq_names.to_vec(),
            seq: self.seq.to_vec(),
            pos: self.pos.to_vec(),
            token: self.token.to_vec(),
            phase: self.phase.to_vec(),
            experts: self.experts.to_vec(),
            weights: self.weights.map(<[f32]>::to_vec),
            // A column the view lacks becomes fill values, so columns stay aligned
            // with `meta.channels`.
            channels: self
                .meta
                .channels
                .iter()
                .enumerate()
                .map(|(c, ch)| match self.channels.get(c) {
                    Some(x) => x.to_values(),
                    None => ChannelValues::filled(
                        ch.dtype,
                        self.n_tokens() * self.meta.n_moe() * ch.width as usize,
                    ),
                })
                .collect(),
        }
    }
}

/// An owned routing trace, stored column-wise (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingTrace {
    pub meta: TraceMeta,
    pub seq_names: Vec<String>,
    pub seq: Vec<u32>,
    pub pos: Vec<u32>,
    pub token: Vec<u32>,
    pub phase: Vec<u8>,
    pub experts: Vec<u16>,
    pub weights: Option<Vec<f32>>,
    /// One column per `meta.channels` entry, in that order (`n_tokens x n_moe x width`).
    pub channels: Vec<ChannelValues>,
}

impl RoutingTrace {
    /// Borrowed view of the whole trace.
    pub fn view(&self) -> TraceView<'_> {
        TraceView {
            meta: &self.meta,
            seq_names: &self.seq_names,
            seq: &self.seq,
            pos: &self.pos,
            token: &self.token,
            phase: &self.phase,
            experts: &self.experts,
            weights: self.weights.as_deref(),
            channels: ChannelColumns::collect(self.channels.iter().map(|c| Some(c.as_slice()))),
        }
    }

    /// Number of tokens.
    pub fn n_tokens(&self) -> usize {
        self.seq.len()
    }

    /// Checks every invariant of a trace: meta, column lengths, ids in range and
    /// distinct within a top-k, sequences contiguous with increasing positions.
    /// Readers of untrusted files call it; the error names the token.
    pub fn validate(&self) -> Result<()> {
        self.meta.validate()?;
        let n = self.n_tokens();
        let slots = self.meta.slots_per_token();
        let bad = |m: String| Err(TraceError::Invalid(m));
        if self.pos.len() != n || self.token.len() != n || self.phase.len() != n {
            return bad("column lengths differ".into());
        }
        if self.experts.len() != n * slots {
            return bad(format!(
                "experts has {} ids, expected {n} tokens x {slots}",
                self.experts.len()
            ));
        }
        if let Some(w) = &self.weights {
            if w.len() != self.experts.len() {
                return bad("weights and experts differ in length".into());
            }
        }
        if self.channels.len() != self.meta.channels.len() {
            return bad(format!(
                "{} channel columns for {} channels in the meta",
                self.channels.len(),
                self.meta.channels.len()
            ));
        }
        for (c, x) in self.meta.channels.iter().zip(&self.channels) {
            let want = n * self.meta.n_moe() * c.width as usize;
            if x.as_slice().dtype() != c.dtype || x.len() != want {
                return bad(format!(
                    "channel {} holds {} {} values, expected {n} tokens x {} MoE layers x {}",
                    c.name,
                    x.len(),
                    x.as_slice().dtype().as_str(),
                    self.meta.n_moe(),
                    c.width
                ));
            }
        }
        let view = self.view();
        let mut seen_seq = vec![false; self.seq_names.len()];
        for t in 0..n {
            let s = self.seq[t] as usize;
            if s >= self.seq_names.len() {
                return bad(format!("token {t}: sequence index {s} out of range"));
            }
            let continues = t > 0 && self.seq[t - 1] as usize == s;
            if !continues {
                if seen_seq[s] {
                    return bad(format!(
                        "token {t}: sequence '{}' is not contiguous",
                        self.seq_names[s]
                    ));
                }
                seen_seq[s] = true;
            } else if self.pos[t] <= self.pos[t - 1] {
                return bad(format!(
                    "token {t}: position {} does not follow {} in sequence '{}'",
                    self.pos[t],
                    self.pos[t - 1],
                    self.seq_names[s]
                ));
            }
            if Phase::from_code(self.phase[t]).is_none() {
                return bad(format!("token {t}: phase code {}", self.phase[t]));
            }
            let k = self.meta.top_k as usize;
            for m in 0..self.meta.n_moe() {
                let raw = &self.experts[(t * self.meta.n_moe() + m) * k..][..k];
                if raw[0] == NOT_COMPUTED {
                    if raw.iter().any(|&e| e != NOT_COMPUTED) {
                        return bad(format!("token {t}, MoE layer {m}: partly computed"));
                    }
                    continue;
                }
                let ids: Vec<u32> = raw.iter().map(|&e| e as u32).collect();
                let w = view.layer_weights(t, m);
                check_topk(&self.meta, &ids, w)
                    .map_err(|e| TraceError::Invalid(format!("token {t}, MoE layer {m}: {e}")))?;
            }
        }
        Ok(())
    }
}

/// Checks one layer's top-k list against the meta: exactly `k` ids, each below
/// `n_experts`, no id twice, weights (if any) aligned and finite. The message is meant
/// to be prefixed with the file and line by the caller.
pub fn check_topk(meta: &TraceMeta, ids: &[u32], weights: Option<&[f32]>) -> Result<(), String> {
    if ids.len() != meta.top_k as usize {
        return Err(format!(
            "expected top_k = {} expert ids, found {}",
            meta.top_k,
            ids.len()
        ));
    }
    for (i, &e) in ids.iter().enumerate() {
        if e >= meta.n_experts {
            return Err(format!(
                "expert id {e} is not below n_experts = {}",
                meta.n_experts
            ));
        }
        if ids[..i].contains(&e) {
            return Err(format!("expert id {e} appears twice in one top-k"));
        }
    }
    if let Some(w) = weights {
        if w.len() != ids.len() {
            return Err(format!("{} weights for {} expert ids", w.len(), ids.len()));
        }
        if let Some(x) = w.iter().find(|x| !x.is_finite()) {
            return Err(format!("router weight {x} is not finite"));
        }
    }
    Ok(())
}
