//! The routing-trace data model.
//!
//! A trace is a sequence of tokens; each token has, for every MoE layer of the model,
//! the router's top-k expert ids (in rank order when the source records it) and their
//! router weights when known, or "not computed". In memory and on disk the routing is
//! stored column-wise: one flat `u16` array of `n_tokens x n_moe_layers x top_k` expert
//! ids and a parallel `f32` array of weights, so any token's routing is a slice.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::builder::TraceBuilder;
use crate::channel::{
    validate_channels, Channel, ChannelColumns, ChannelRecord, ChannelSlice, ChannelValues,
    ROUTER_INPUTS, ROUTER_LOGITS,
};
use crate::error::{Result, TraceError};

/// Expert id marking a layer that was not computed for a token (all `k` slots hold it).
pub const NOT_COMPUTED: u16 = u16::MAX;
/// Token id marking an unknown token.
pub const UNKNOWN_TOKEN: u32 = u32::MAX;

/// What the trace is of: the model, its MoE shape, where the routing came from and the
/// per-(token, layer) vectors it carries besides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "TraceMetaRepr")]
pub struct TraceMeta {
    /// Model name or path as the source gave it.
    pub model: String,
    /// Architecture family (`qwen3_moe`, `mixtral`, `gpt-oss`, ...), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Number of transformer layers of the model (dense and MoE).
    pub n_layers: u32,
    /// Model layer index of each MoE layer, ascending. Routing is stored in this order.
    pub moe_layers: Vec<u32>,
    /// Routed experts per MoE layer.
    pub n_experts: u32,
    /// Experts chosen per token and MoE layer.
    pub top_k: u32,
    /// Always-active shared experts per MoE layer (not part of the routing).
    #[serde(default)]
    pub n_shared_experts: u32,
    /// Engine or format the routing came from (`moecast`, `route_trace_v1`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Tokenizer the token ids refer to, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// True when each top-k list is in rank order (highest router weight first); false
    /// when the source only recorded the set (ids sorted ascending).
    #[serde(default = "default_true")]
    pub ranked: bool,
    /// Bytes of one expert's weights, per MoE layer, when the source reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_bytes: Option<Vec<u64>>,
    /// The per-(token, MoE layer) vectors the trace carries (router inputs, router
    /// logits, ...; see [`crate::channel`]), in storage order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<Channel>,
}

fn default_true() -> bool {
    true
}

/// [`TraceMeta`] as files spell it: today's fields plus the two that described router
/// inputs and logits before channels (`router_input_dim`, `router_logits`), read into
/// channels so older files keep loading.
#[derive(Deserialize)]
struct TraceMetaRepr {
    model: String,
    #[serde(default)]
    architecture: Option<String>,
    n_layers: u32,
    moe_layers: Vec<u32>,
    n_experts: u32,
    top_k: u32,
    #[serde(default)]
    n_shared_experts: u32,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    tokenizer: Option<String>,
    #[serde(default = "default_true")]
    ranked: bool,
    #[serde(default)]
    expert_bytes: Option<Vec<u64>>,
    #[serde(default)]
    channels: Vec<Channel>,
    #[serde(default)]
    router_input_dim: Option<u32>,
    #[serde(default)]
    router_logits: bool,
}

impl From<TraceMetaRepr> for TraceMeta {
    fn from(r: TraceMetaRepr) -> TraceMeta {
        let mut channels = r.channels;
        let legacy = [
            r.router_input_dim.map(Channel::router_inputs),
            r.router_logits.then(|| Channel::router_logits(r.n_experts)),
        ];
        for c in legacy.into_iter().flatten() {
            if !channels.iter().any(|o| o.name == c.name) {
                channels.push(c);
            }
        }
        TraceMeta {
            model: r.model,
            architecture: r.architecture,
            n_layers: r.n_layers,
            moe_layers: r.moe_layers,
            n_experts: r.n_experts,
            top_k: r.top_k,
            n_shared_experts: r.n_shared_experts,
            source: r.source,
            tokenizer: r.tokenizer,
            ranked: r.ranked,
            expert_bytes: r.expert_bytes,
            channels,
        }
    }
}

impl TraceMeta {
    /// Number of MoE layers.
    pub fn n_moe(&self) -> usize {
        self.moe_layers.len()
    }

    /// Expert-id slots per token: `n_moe_layers x top_k`.
    pub fn slots_per_token(&self) -> usize {
        self.moe_layers.len() * self.top_k as usize
    }

    /// Index of channel `name` in [`TraceMeta::channels`].
    pub fn channel_index(&self, name: &str) -> Option<usize> {
        self.channels.iter().position(|c| c.name == name)
    }

    /// Channel `name`, when the trace carries it.
    pub fn channel(&self, name: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.name == name)
    }

    /// Width of the router-input channel, when the trace carries router inputs.
    pub fn router_input_dim(&self) -> Option<u32> {
        self.channel(ROUTER_INPUTS).map(|c| c.width)
    }

    /// Whether `other` describes the same routing shape (layers, MoE layers, E, k).
    pub fn same_shape(&self, other: &TraceMeta) -> bool {
        self.n_layers == other.n_layers
            && self.moe_layers == other.moe_layers
            && self.n_experts == other.n_experts
            && self.top_k == other.top_k
    }

    /// Checks the metadata's own invariants.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TraceError::Invalid(m));
        if self.moe_layers.is_empty() {
            return bad("meta: moe_layers is empty".into());
        }
        if self.n_experts == 0 || self.n_experts >= NOT_COMPUTED as u32 {
            return bad(format!(
                "meta: n_experts = {} (must be 1..{})",
                self.n_experts, NOT_COMPUTED
            ));
        }
        if self.top_k == 0 || self.top_k > self.n_experts {
            return bad(format!(
                "meta: top_k = {} (must be 1..=n_experts = {})",
                self.top_k, self.n_experts
            ));
        }
        if self.moe_layers.windows(2).any(|w| w[0] >= w[1]) {
            return bad("meta: moe_layers must be strictly ascending".into());
        }
        if let Some(&last) = self.moe_layers.last() {
            if last >= self.n_layers {
                return bad(format!(
                    "meta: MoE layer {last} is not below n_layers = {}",
                    self.n_layers
                ));
            }
        }
        if let Some(b) = &self.expert_bytes {
            if b.len() != self.moe_layers.len() {
                return bad(format!(
                    "meta: expert_bytes has {} entries for {} MoE layers",
                    b.len(),
                    self.moe_layers.len()
                ));
            }
        }
        validate_channels(&self.channels, self.n_experts)
            .map_err(|e| TraceError::Invalid(format!("meta: {e}")))
    }
}

/// Whether a token was part of the prompt or generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Prefill,
    Decode,
}

impl Phase {
    /// The on-disk byte code: 0 prefill, 1 decode.
    pub fn code(self) -> u8 {
        match self {
            Phase::Prefill => 0,
            Phase::Decode => 1,
        }
    }

    /// Decodes [`Phase::code`].
    pub fn from_code(c: u8) -> Option<Phase> {
        match c {
            0 => Some(Phase::Prefill),
            1 => Some(Phase::Decode),
            _ => None,
        }
    }

    /// `"prefill"` or `"decode"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        }
    }

    /// Parses `"prefill"` / `"decode"`.
    pub fn parse(s: &str) -> Option<Phase> {
        match s {
            "prefill" => Some(Phase::Prefill),
            "decode" => Some(Phase::Decode),
            _ => None,
        }
    }
}

/// One token's routing as an owned record: the unit importers produce and the
/// interchange JSONL line (each channel is a field named after it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TokenRecordRepr")]
pub struct TokenRecord {
    /// Sequence (prompt / request) name.
    pub seq: String,
    /// Position of the token in its sequence.
    pub pos: u32,
    /// Prefill or decode.
    pub phase: Phase,
    /// Token id, when known.
    pub token: Option<u32>,
    /// Per MoE layer: top-k expert ids (rank order when the trace is ranked) or `None`
    /// when the layer was not computed for this token.
    pub experts: Vec<Option<Vec<u32>>>,
    /// Per MoE layer: router weights aligned with `experts`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<Option<Vec<f32>>>>,
    /// Per channel name (see [`crate::channel`]): the token's vector at each MoE layer,
    /// `None` where the layer was not computed or not recorded.
    #[serde(flatten)]
    pub channels: BTreeMap<String, ChannelRecord>,
}

/// [`TokenRecord`] as a JSONL line spells it: each field it does not know that is shaped
/// like a channel (a non-empty list whose items are lists or `null`, one per MoE layer;
/// `null` inside an item is NaN, which is how JSON writes it) is a channel, which the
/// trace's meta must then list; other unknown fields are ignored.
#[derive(Deserialize)]
struct TokenRecordRepr {
    seq: String,
    pos: u32,
    phase: Phase,
    #[serde(default)]
    token: Option<u32>,
    experts: Vec<Option<Vec<u32>>>,
    #[serde(default)]
    weights: Option<Vec<Option<Vec<f32>>>>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

impl TryFrom<TokenRecordRepr> for TokenRecord {
    type Error = String;

    fn try_from(r: TokenRecordRepr) -> std::result::Result<TokenRecord, String> {
        let mut channels = BTreeMap::new();
        for (name, value) in r.other {
            if let serde_json::Value::Array(layers) = value {
                let per_layer =
                    !layers.is_empty() && layers.iter().all(|c| c.is_null() || c.is_array());
                if per_layer {
                    let record = channel_record(&name, layers)?;
                    channels.insert(name, record);
                }
            }
        }
        Ok(TokenRecord {
            seq: r.seq,
            pos: r.pos,
            phase: r.phase,
            token: r.token,
            experts: r.experts,
            weights: r.weights,
            channels,
        })
    }
}

/// One channel field of a JSONL line: per MoE layer a list of numbers (`null` = NaN) or
/// `null`.
fn channel_record(
    name: &str,
    layers: Vec<serde_json::Value>,
) -> std::result::Result<ChannelRecord, String> {
    use serde_json::Value;
    let bad = |m: usize, what: &Value| {
        format!("'{name}', MoE layer index {m}: expected a list of numbers or null, found {what}")
    };
    layers
        .into_iter()
        .enumerate()
        .map(|(m, cell)| match cell {
            Value::Null => Ok(None),
            Value::Array(xs) => xs
                .iter()
                .map(|x| match x {
                    Value::Null => Ok(f32::NAN),
                    Value::Number(n) => n.as_f64().map(|f| f as f32).ok_or_else(|| bad(m, x)),
                    other => Err(bad(m, other)),
                })
                .collect::<std::result::Result<Vec<f32>, String>>()
                .map(Some),
            other => Err(bad(m, &other)),
        })
        .collect()
}

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
        match self.channel_column(ROUTER_INPUTS)? {
            ChannelSlice::F16(x) => Some(x),
            ChannelSlice::F32(_) => None,
        }
    }

    /// The router input of token `t` at MoE layer index `m` (f16 bits), when recorded
    /// and the layer was computed.
    pub fn router_input(&self, t: usize, m: usize) -> Option<&'a [u16]> {
        match self.channel(self.meta.channel_index(ROUTER_INPUTS)?, t, m)? {
            ChannelSlice::F16(x) => Some(x),
            ChannelSlice::F32(_) => None,
        }
    }

    /// [`TraceView::router_input`] as f32 values.
    pub fn router_input_f32(&self, t: usize, m: usize) -> Option<Vec<f32>> {
        self.channel_f32(ROUTER_INPUTS, t, m)
    }

    /// The router logits of token `t` at MoE layer index `m`, when recorded and computed.
    pub fn router_logits(&self, t: usize, m: usize) -> Option<&'a [f32]> {
        match self.channel(self.meta.channel_index(ROUTER_LOGITS)?, t, m)? {
            ChannelSlice::F32(x) => Some(x),
            ChannelSlice::F16(_) => None,
        }
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
                    None => {
                        let w = ch.width as usize;
                        let mut v = ChannelValues::with_capacity(
                            ch.dtype,
                            self.n_tokens() * self.meta.n_moe() * w,
                        );
                        for _ in 0..self.n_tokens() * self.meta.n_moe() {
                            v.push(None, w);
                        }
                        v
                    }
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
