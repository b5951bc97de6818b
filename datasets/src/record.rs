//! [`TokenRecord`]: one token's routing as an owned record (the unit importers produce
//! and the interchange JSONL line), and its [`Phase`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::channel::ChannelRecord;

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
