//! [`BaselineStats`] as safetensors (`baselines.safetensors` of a predictor directory).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use datasets::examples::RoutingShape;
use safetensors::tensor::{Dtype, TensorView};

use super::BaselineStats;
use crate::error::{PredictorError, Result};
use crate::token_table::{FlatTokenTable, TokenTable};

impl BaselineStats {
    /// Writes the counts as safetensors (`frequency`, `coactivation`, the per-token
    /// first-layer counts as `first_layer_tokens` `[n]` u32 with `first_layer_counts`
    /// `[n, n_experts]`, and the token table as `token_ids` `[n]` u32, `token_row_start`
    /// `[n + 1]` u32, `token_layers` / `token_experts` `[nnz]` u16 and `token_counts`
    /// `[nnz]` f32, see [`TokenTable::flatten`]).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let (m, e, d) = (self.shape.n_moe, self.shape.n_experts, self.horizon);
        let n = self.first_layer_by_token.len();
        let ids: Vec<u32> = self.first_layer_by_token.keys().copied().collect();
        let counts: Vec<f32> = self
            .first_layer_by_token
            .values()
            .flatten()
            .copied()
            .collect();
        let mut tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
            (
                "frequency",
                Dtype::F32,
                vec![m, e],
                bytes_of(&self.frequency),
            ),
            (
                "coactivation",
                Dtype::F32,
                vec![d, m, e, e],
                bytes_of(&self.coactivation),
            ),
            ("first_layer_tokens", Dtype::U32, vec![n], u32_bytes(&ids)),
            (
                "first_layer_counts",
                Dtype::F32,
                vec![n, e],
                bytes_of(&counts),
            ),
        ];
        if let Some(t) = &self.token_table {
            let f = t.flatten();
            let u16s = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            let nnz = f.counts.len();
            tensors.extend([
                (
                    "token_ids",
                    Dtype::U32,
                    vec![f.ids.len()],
                    u32_bytes(&f.ids),
                ),
                (
                    "token_row_start",
                    Dtype::U32,
                    vec![f.row_start.len()],
                    u32_bytes(&f.row_start),
                ),
                ("token_layers", Dtype::U16, vec![nnz], u16s(&f.layers)),
                ("token_experts", Dtype::U16, vec![nnz], u16s(&f.experts)),
                ("token_counts", Dtype::F32, vec![nnz], bytes_of(&f.counts)),
            ]);
        }
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                TensorView::new(*dtype, shape.clone(), bytes).map(|v| (*name, v))
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| PredictorError::Invalid(format!("baseline tensors: {e}")))?;
        safetensors::serialize(views, None)
            .map_err(|e| PredictorError::Invalid(format!("baseline tensors: {e}")))
    }

    /// Reads counts written by [`Self::to_safetensors`] (files written before the
    /// per-token first-layer counts or the token table existed read without them).
    pub fn from_safetensors(bytes: &[u8], shape: RoutingShape, path: &Path) -> Result<Self> {
        let bad = |msg: String| PredictorError::file(path, msg);
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let names = st.names();
        let groups: [&[&str]; 2] = [
            &["first_layer_tokens", "first_layer_counts"],
            &[
                "token_ids",
                "token_row_start",
                "token_layers",
                "token_experts",
                "token_counts",
            ],
        ];
        for g in groups {
            let present = g.iter().filter(|n| names.contains(n)).count();
            if present != 0 && present != g.len() {
                return Err(bad(format!(
                    "{} come together: some are missing",
                    g.join(", ")
                )));
            }
        }
        let mut tensors = HashMap::new();
        for (name, dtype) in [
            ("frequency", Dtype::F32),
            ("coactivation", Dtype::F32),
            ("first_layer_tokens", Dtype::U32),
            ("first_layer_counts", Dtype::F32),
            ("token_ids", Dtype::U32),
            ("token_row_start", Dtype::U32),
            ("token_layers", Dtype::U16),
            ("token_experts", Dtype::U16),
            ("token_counts", Dtype::F32),
        ] {
            if name != "frequency" && name != "coactivation" && !names.contains(&name) {
                continue;
            }
            let t = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
            if t.dtype() != dtype {
                return Err(bad(format!(
                    "{name}: expected {dtype:?}, found {:?}",
                    t.dtype()
                )));
            }
            tensors.insert(name, (t.shape().to_vec(), t.data().to_vec()));
        }
        let f32s = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        let (fs, frequency) = tensors.remove("frequency").expect("read above");
        let (cs, coactivation) = tensors.remove("coactivation").expect("read above");
        let (m, e) = (shape.n_moe, shape.n_experts);
        if fs != [m, e] || cs.len() != 4 || cs[0] == 0 || cs[1..] != [m, e, e] {
            return Err(bad(format!(
                "shapes {fs:?} / {cs:?} do not match {m} layers x {e} experts"
            )));
        }
        let mut first_layer_by_token = BTreeMap::new();
        if let (Some((ts, ids)), Some((ns, counts))) = (
            tensors.remove("first_layer_tokens"),
            tensors.remove("first_layer_counts"),
        ) {
            if ts.len() != 1 || ns != [ts[0], e] {
                return Err(bad(format!(
                    "first_layer_tokens {ts:?} / first_layer_counts {ns:?}: expected [n] and [n, {e}]"
                )));
            }
            let counts = f32s(counts);
            for (id, row) in ids.chunks_exact(4).zip(counts.chunks_exact(e)) {
                let token = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
                if let Some(c) = row.iter().find(|c| !c.is_finite() || **c < 0.0) {
                    return Err(bad(format!(
                        "first_layer_counts of token {token}: {c} is not a count"
                    )));
                }
                if first_layer_by_token.insert(token, row.to_vec()).is_some() {
                    return Err(bad(format!("first_layer_tokens: token {token} twice")));
                }
            }
        }
        let token_table = match tensors.remove("token_ids") {
            None => None,
            Some((_, ids)) => {
                let mut take =
                    |name: &str| tensors.remove(name).map(|(_, b)| b).unwrap_or_default();
                let u16s = |b: Vec<u8>| -> Vec<u16> {
                    b.chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]))
                        .collect()
                };
                let flat = FlatTokenTable {
                    ids: u32s(ids),
                    row_start: u32s(take("token_row_start")),
                    layers: u16s(take("token_layers")),
                    experts: u16s(take("token_experts")),
                    counts: f32s(take("token_counts")),
                };
                Some(TokenTable::from_flat(shape, &flat).map_err(bad)?)
            }
        };
        let mut s = BaselineStats {
            shape,
            horizon: cs[0],
            frequency: f32s(frequency),
            coactivation: f32s(coactivation),
            first_layer_by_token,
            token_table,
            frequency_order: Vec::new(),
            shares: Vec::new(),
        };
        s.refresh_order();
        Ok(s)
    }
}

pub(super) fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32s(b: Vec<u8>) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
