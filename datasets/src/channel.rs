//! Channels: per-(token, MoE layer) vectors a trace may carry beside the routing, such
//! as the router's input, its logits, or the logits a layer's gate gives the hidden
//! state before attention.
//!
//! A channel is named, typed ([`ChannelDtype`]) and has a fixed width. Its values are
//! one column of `n_tokens x n_moe x width` elements, token-major, the way the expert
//! ids are stored; a cell of a layer that was not computed (or that the source did not
//! record) holds the fill value (0 for f16, NaN for f32). The same name is the
//! `.mctrace` section, the Parquet list column and the JSONL field of the channel, so a
//! new kind of vector is one [`Channel`] in the meta, not a new code path.

use serde::{Deserialize, Serialize};

/// Most channels one trace carries (a [`crate::TraceView`] holds them in a fixed array).
pub const MAX_CHANNELS: usize = 8;
/// The vector each MoE layer's gate read (the normalised hidden state), stored f16.
pub const ROUTER_INPUTS: &str = "router_inputs";
/// The router's logits over all experts, f32 (`n_experts` wide).
pub const ROUTER_LOGITS: &str = "router_logits";
/// The layer's gate applied to the hidden state before the layer's attention (the
/// pre-attention predictor's signal), f32 (`n_experts` wide).
pub const PRE_ATTENTION_LOGITS: &str = "pre_attention_logits";

/// Names a channel may not take: the trace's own columns and sections, and the keys
/// the Python `read_trace` returns beside the channels.
const RESERVED: &[&str] = &[
    "seq",
    "pos",
    "token",
    "phase",
    "layer",
    "experts",
    "weights",
    "meta",
    "channels",
    "model",
    "n_moe_layers",
    "n_experts",
    "top_k",
    "seq_names",
    "router_input_dim",
];

/// Element type of a channel's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelDtype {
    /// IEEE half precision (stored as its bits).
    F16,
    F32,
}

impl ChannelDtype {
    /// The tag used in headers and messages: `f16` / `f32`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelDtype::F16 => "f16",
            ChannelDtype::F32 => "f32",
        }
    }
}

/// One per-(token, MoE layer) vector of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    /// Lower-case ASCII letters, digits and `_`; the section, column and field name.
    pub name: String,
    pub dtype: ChannelDtype,
    /// Values per (token, MoE layer).
    pub width: u32,
}

impl Channel {
    /// The router inputs of a model with hidden size `hidden`.
    pub fn router_inputs(hidden: u32) -> Channel {
        Channel::new(ROUTER_INPUTS, ChannelDtype::F16, hidden)
    }

    /// The router logits of a model with `n_experts` experts.
    pub fn router_logits(n_experts: u32) -> Channel {
        Channel::new(ROUTER_LOGITS, ChannelDtype::F32, n_experts)
    }

    /// The pre-attention gate logits of a model with `n_experts` experts.
    pub fn pre_attention_logits(n_experts: u32) -> Channel {
        Channel::new(PRE_ATTENTION_LOGITS, ChannelDtype::F32, n_experts)
    }

    /// A channel of any name.
    pub fn new(name: &str, dtype: ChannelDtype, width: u32) -> Channel {
        Channel {
            name: name.to_string(),
            dtype,
            width,
        }
    }

    /// `name (dtype x width)`, for messages.
    pub fn describe(&self) -> String {
        format!("{} ({} x {})", self.name, self.dtype.as_str(), self.width)
    }

    /// Checks the channel against a trace's expert count: a valid name, a width, and
    /// the fixed dtype / width of the channels moecast knows.
    pub fn validate(&self, n_experts: u32) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !name_ok {
            return Err(format!(
                "channel name '{}' must be lower-case letters, digits and '_'",
                self.name
            ));
        }
        if RESERVED.contains(&self.name.as_str()) {
            return Err(format!("channel name '{}' is reserved", self.name));
        }
        if self.width == 0 {
            return Err(format!("channel '{}' has width 0", self.name));
        }
        let fixed = match self.name.as_str() {
            ROUTER_INPUTS => Some((ChannelDtype::F16, None)),
            ROUTER_LOGITS | PRE_ATTENTION_LOGITS => Some((ChannelDtype::F32, Some(n_experts))),
            _ => None,
        };
        if let Some((dtype, width)) = fixed {
            if self.dtype != dtype || width.is_some_and(|w| w != self.width) {
                return Err(format!(
                    "channel {} must be {} x {}",
                    self.describe(),
                    dtype.as_str(),
                    width.map_or("hidden size".to_string(), |w| format!("n_experts = {w}"))
                ));
            }
        }
        Ok(())
    }
}

/// Checks a meta's channel list: each channel valid, names distinct, at most
/// [`MAX_CHANNELS`].
pub fn validate_channels(channels: &[Channel], n_experts: u32) -> Result<(), String> {
    if channels.len() > MAX_CHANNELS {
        return Err(format!(
            "{} channels (at most {MAX_CHANNELS})",
            channels.len()
        ));
    }
    for (i, c) in channels.iter().enumerate() {
        c.validate(n_experts)?;
        if channels[..i].iter().any(|o| o.name == c.name) {
            return Err(format!("channel '{}' listed twice", c.name));
        }
    }
    Ok(())
}

/// The stored values of one channel (`n_tokens x n_moe x width`, fill where absent).
#[derive(Debug, Clone, PartialEq)]
pub enum ChannelValues {
    /// f16 bits.
    F16(Vec<u16>),
    F32(Vec<f32>),
}

impl ChannelValues {
    /// An empty column of `dtype` with room for `capacity` values.
    pub fn with_capacity(dtype: ChannelDtype, capacity: usize) -> ChannelValues {
        match dtype {
            ChannelDtype::F16 => ChannelValues::F16(Vec::with_capacity(capacity)),
            ChannelDtype::F32 => ChannelValues::F32(Vec::with_capacity(capacity)),
        }
    }

    /// Appends one cell: `values` (converted to the column's dtype) or `width` fill
    /// values when `None`. The caller checks `values.len() == width`.
    pub fn push(&mut self, values: Option<&[f32]>, width: usize) {
        match (self, values) {
            (ChannelValues::F16(c), Some(v)) => {
                c.extend(v.iter().map(|&x| half::f16::from_f32(x).to_bits()))
            }
            (ChannelValues::F16(c), None) => c.extend(std::iter::repeat_n(0u16, width)),
            (ChannelValues::F32(c), Some(v)) => c.extend_from_slice(v),
            (ChannelValues::F32(c), None) => c.extend(std::iter::repeat_n(f32::NAN, width)),
        }
    }

    /// A column of `len` fill values (0 for f16, NaN for f32).
    pub fn filled(dtype: ChannelDtype, len: usize) -> ChannelValues {
        match dtype {
            ChannelDtype::F16 => ChannelValues::F16(vec![0; len]),
            ChannelDtype::F32 => ChannelValues::F32(vec![f32::NAN; len]),
        }
    }

    /// Appends `other`'s values; false (nothing appended) when the dtypes differ.
    pub fn append(&mut self, other: &ChannelValues) -> bool {
        match (self, other) {
            (ChannelValues::F16(a), ChannelValues::F16(b)) => a.extend_from_slice(b),
            (ChannelValues::F32(a), ChannelValues::F32(b)) => a.extend_from_slice(b),
            _ => return false,
        }
        true
    }

    /// The column as a borrowed slice.
    pub fn as_slice(&self) -> ChannelSlice<'_> {
        match self {
            ChannelValues::F16(v) => ChannelSlice::F16(v),
            ChannelValues::F32(v) => ChannelSlice::F32(v),
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether the column holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Borrowed values of a channel: a whole column or one cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ChannelSlice<'a> {
    /// f16 bits.
    F16(&'a [u16]),
    F32(&'a [f32]),
}

impl<'a> ChannelSlice<'a> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            ChannelSlice::F16(v) => v.len(),
            ChannelSlice::F32(v) => v.len(),
        }
    }

    /// Whether the slice holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> ChannelDtype {
        match self {
            ChannelSlice::F16(_) => ChannelDtype::F16,
            ChannelSlice::F32(_) => ChannelDtype::F32,
        }
    }

    /// The f16 bits, when the values are f16.
    pub fn as_f16(&self) -> Option<&'a [u16]> {
        match *self {
            ChannelSlice::F16(v) => Some(v),
            ChannelSlice::F32(_) => None,
        }
    }

    /// The values, when they are f32.
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        match *self {
            ChannelSlice::F32(v) => Some(v),
            ChannelSlice::F16(_) => None,
        }
    }

    /// The values `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> ChannelSlice<'a> {
        match *self {
            ChannelSlice::F16(v) => ChannelSlice::F16(&v[range]),
            ChannelSlice::F32(v) => ChannelSlice::F32(&v[range]),
        }
    }

    /// The values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match *self {
            ChannelSlice::F16(v) => v
                .iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect(),
            ChannelSlice::F32(v) => v.to_vec(),
        }
    }

    /// The raw little-endian bytes (what the binary form stores).
    pub fn as_bytes(&self) -> &'a [u8] {
        match *self {
            ChannelSlice::F16(v) => bytemuck::cast_slice(v),
            ChannelSlice::F32(v) => bytemuck::cast_slice(v),
        }
    }

    /// An owned copy.
    pub fn to_values(&self) -> ChannelValues {
        match *self {
            ChannelSlice::F16(v) => ChannelValues::F16(v.to_vec()),
            ChannelSlice::F32(v) => ChannelValues::F32(v.to_vec()),
        }
    }
}

/// The channel columns of a trace view, in the order of `meta.channels`: a fixed
/// array, so views stay `Copy` and taking a token range allocates nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChannelColumns<'a> {
    cols: [Option<ChannelSlice<'a>>; MAX_CHANNELS],
}

impl<'a> ChannelColumns<'a> {
    /// Columns from an iterator (channel `i` is the `i`-th item; `None` = not stored).
    /// Items past [`MAX_CHANNELS`] are dropped (metas with more are refused earlier).
    pub fn collect(cols: impl IntoIterator<Item = Option<ChannelSlice<'a>>>) -> Self {
        let mut out = ChannelColumns::default();
        for (slot, c) in out.cols.iter_mut().zip(cols) {
            *slot = c;
        }
        out
    }

    /// Column of channel `i`, when stored.
    pub fn get(&self, i: usize) -> Option<ChannelSlice<'a>> {
        self.cols.get(i).copied().flatten()
    }

    /// Every column mapped through `f` (used to take token ranges).
    pub fn map(&self, f: impl Fn(usize, ChannelSlice<'a>) -> ChannelSlice<'a>) -> Self {
        let mut out = *self;
        for (i, c) in out.cols.iter_mut().enumerate() {
            *c = c.map(|s| f(i, s));
        }
        out
    }
}

/// One token's values of one channel, per MoE layer (`None` where not recorded).
pub type ChannelRecord = Vec<Option<Vec<f32>>>;
