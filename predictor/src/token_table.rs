//! The token table: per token id seen in training and per MoE layer, how often each
//! expert was chosen. Stored sparsely (only seen ids, only experts chosen at least once),
//! so a vocabulary of 150 k ids over 60 layers of 256 experts costs what the training
//! trace holds, not the dense `vocab x layers x experts` product.
//!
//! Its forecast for a token ranks the layer's experts by that id's counts, ties broken
//! by the layer's frequency; an id seen fewer than [`MIN_COUNT`] times (or unknown)
//! backs off to the layer's frequency order.
//!
//! As a probability (the predictor's prior path and the combined baseline), expert `x`
//! of layer `l` for an id seen `n` times at `l`, `c` of them with `x`, is
//! `q = (c + α k f_l(x)) / (n + α)` with `f_l` the layer's share of choices (so `k f_l`
//! is the chance a token of any id picks `x`) and `α =` [`PSEUDO_COUNT`] tokens.

use std::collections::BTreeMap;

use datasets::examples::RoutingShape;

/// Ids seen fewer times than this at a layer back off to the layer's frequency.
pub const MIN_COUNT: f32 = 1.0;

/// Smoothing of the per-id probabilities, in tokens of the layer's frequency.
pub const PSEUDO_COUNT: f32 = 1.0;

/// Probabilities are clamped to `[P_MIN, 1 - P_MIN]` before taking log-odds.
const P_MIN: f32 = 1e-6;

/// One counted (layer, expert) of an id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenEntry {
    pub layer: u16,
    pub expert: u16,
    pub count: f32,
}

/// The counts of one id, sorted by (layer, expert).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenRow {
    pub entries: Vec<TokenEntry>,
}

impl TokenRow {
    /// The entries of `layer`.
    pub fn layer(&self, layer: usize) -> &[TokenEntry] {
        let lo = self.entries.partition_point(|x| (x.layer as usize) < layer);
        let hi = self
            .entries
            .partition_point(|x| (x.layer as usize) <= layer);
        &self.entries[lo..hi]
    }

    fn add(&mut self, layer: usize, expert: u16, by: f32) {
        let key = (layer as u16, expert);
        match self
            .entries
            .binary_search_by(|x| (x.layer, x.expert).cmp(&key))
        {
            Ok(i) => self.entries[i].count += by,
            Err(i) => self.entries.insert(
                i,
                TokenEntry {
                    layer: key.0,
                    expert,
                    count: by,
                },
            ),
        }
    }
}

/// Per-id expert counts (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTable {
    pub shape: RoutingShape,
    pub rows: BTreeMap<u32, TokenRow>,
}

impl TokenTable {
    /// An empty table.
    pub fn new(shape: RoutingShape) -> Self {
        TokenTable {
            shape,
            rows: BTreeMap::new(),
        }
    }

    /// Counts one token of id `token` choosing `experts` at `layer`.
    pub fn add(&mut self, token: u32, layer: usize, experts: &[u16]) {
        let row = self.rows.entry(token).or_default();
        for &x in experts {
            row.add(layer, x, 1.0);
        }
    }

    /// Counted (layer, expert) pairs in all.
    pub fn n_entries(&self) -> usize {
        self.rows.values().map(|r| r.entries.len()).sum()
    }

    /// The entries of `token` at `layer` with the number of tokens counted there, if
    /// the id was seen at least [`MIN_COUNT`] times there. `exclude` (a set the id chose
    /// at that layer) is taken out of the counts first: the leave-one-out view of a
    /// training token.
    fn counts(
        &self,
        token: Option<u32>,
        layer: usize,
        exclude: Option<&[u16]>,
        out: &mut [f32],
    ) -> Option<f32> {
        let row = self.rows.get(&token?)?;
        out.iter_mut().for_each(|c| *c = 0.0);
        for x in row.layer(layer) {
            out[x.expert as usize] = x.count;
        }
        for &x in exclude.unwrap_or(&[]) {
            if let Some(c) = out.get_mut(x as usize) {
                *c = (*c - 1.0).max(0.0);
            }
        }
        let seen = out.iter().sum::<f32>() / self.shape.top_k as f32;
        (seen >= MIN_COUNT).then_some(seen)
    }

    /// Writes `token`'s counts at `layer` into `out`; false (and `out` unspecified) when
    /// the id backs off to the layer's frequency.
    pub fn rank_counts(&self, token: Option<u32>, layer: usize, out: &mut [f32]) -> bool {
        self.counts(token, layer, None, out).is_some()
    }

    /// Log-odds that each expert of `layer` is chosen for `token` (smoothed towards
    /// `freq`, the layer's share of choices; `freq` alone when the id backs off), with
    /// `exclude` taken out of the counts (see [`TokenTable::counts`]).
    pub fn log_odds(
        &self,
        token: Option<u32>,
        layer: usize,
        exclude: Option<&[u16]>,
        freq: &[f32],
        out: &mut [f32],
    ) {
        let k = self.shape.top_k as f32;
        match self.counts(token, layer, exclude, out) {
            Some(n) => {
                for (c, f) in out.iter_mut().zip(freq) {
                    *c = log_odds((*c + PSEUDO_COUNT * k * f) / (n + PSEUDO_COUNT));
                }
            }
            None => {
                for (c, f) in out.iter_mut().zip(freq) {
                    *c = log_odds(k * f);
                }
            }
        }
    }
}

/// `ln(p / (1 - p))` with `p` clamped away from 0 and 1.
pub fn log_odds(p: f32) -> f32 {
    let p = p.clamp(P_MIN, 1.0 - P_MIN);
    (p / (1.0 - p)).ln()
}

/// The table as flat arrays: `ids [n]`, `row_start [n + 1]` into the entries, and the
/// entries' `layers`, `experts` and `counts` (sorted by id, then layer, then expert).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlatTokenTable {
    pub ids: Vec<u32>,
    pub row_start: Vec<u32>,
    pub layers: Vec<u16>,
    pub experts: Vec<u16>,
    pub counts: Vec<f32>,
}

impl TokenTable {
    /// Flattens the table for storage.
    pub fn flatten(&self) -> FlatTokenTable {
        let mut f = FlatTokenTable {
            row_start: vec![0],
            ..FlatTokenTable::default()
        };
        for (&id, row) in &self.rows {
            f.ids.push(id);
            for x in &row.entries {
                f.layers.push(x.layer);
                f.experts.push(x.expert);
                f.counts.push(x.count);
            }
            f.row_start.push(f.layers.len() as u32);
        }
        f
    }

    /// Rebuilds a table from [`TokenTable::flatten`]'s arrays; the message names what is
    /// inconsistent.
    pub fn from_flat(shape: RoutingShape, f: &FlatTokenTable) -> Result<Self, String> {
        let nnz = f.layers.len();
        if f.experts.len() != nnz || f.counts.len() != nnz {
            return Err(format!(
                "token_layers, token_experts and token_counts differ in length ({nnz}, {}, {})",
                f.experts.len(),
                f.counts.len()
            ));
        }
        if f.row_start.len() != f.ids.len() + 1
            || f.row_start.first() != Some(&0)
            || f.row_start.last().map(|&x| x as usize) != Some(nnz)
            || f.row_start.windows(2).any(|w| w[0] > w[1])
        {
            return Err(format!(
                "token_row_start must rise from 0 to {nnz} in {} steps",
                f.ids.len()
            ));
        }
        let mut rows = BTreeMap::new();
        for (i, &id) in f.ids.iter().enumerate() {
            let (a, b) = (f.row_start[i] as usize, f.row_start[i + 1] as usize);
            let mut row = TokenRow::default();
            for j in a..b {
                let (l, x, c) = (f.layers[j], f.experts[j], f.counts[j]);
                if l as usize >= shape.n_moe || x as usize >= shape.n_experts {
                    return Err(format!(
                        "token {id}: layer {l} expert {x} is outside {} layers x {} experts",
                        shape.n_moe, shape.n_experts
                    ));
                }
                if !c.is_finite() || c < 0.0 {
                    return Err(format!("token {id}: count {c} is not a count"));
                }
                if row
                    .entries
                    .last()
                    .is_some_and(|p: &TokenEntry| (p.layer, p.expert) >= (l, x))
                {
                    return Err(format!(
                        "token {id}: entries not sorted by layer and expert"
                    ));
                }
                row.entries.push(TokenEntry {
                    layer: l,
                    expert: x,
                    count: c,
                });
            }
            if rows.insert(id, row).is_some() {
                return Err(format!("token_ids: token {id} twice"));
            }
        }
        Ok(TokenTable { shape, rows })
    }
}
