//! Training-free baselines, fitted on the training split and stored beside the model:
//!
//! - **previous-token reuse**: token `t` uses the experts token `t-1` used at the same
//!   layer (the first token of a sequence falls back to frequency);
//! - **per-layer frequency**: the `k` experts most often chosen at that layer;
//! - **cross-layer co-activation** (lookahead): experts of layer `l+h` scored by how
//!   often each co-occurred, in the same token, with the experts chosen at layer `l`.
//!
//! - **token table**: per token id, the experts that id chose most often at that layer
//!   (see [`crate::token_table`]; unseen ids back off to frequency);
//! - **token + co-activation** (lookahead): the token table and co-activation together,
//!   as a naive-Bayes sum of smoothed log-odds:
//!   `logit q_token + logit q_coact - logit q_frequency`.
//!
//! Every ranking is completed with the frequency order, so budgets above `k` work.
//!
//! Beside them, per token id, how often each expert of the first MoE layer was chosen
//! for that token (the runtime's logit lens refines its table of candidates with it).

use std::collections::BTreeMap;

use datasets::examples::RoutingShape;
use datasets::TraceView;

use crate::token_table::{log_odds, TokenTable, PSEUDO_COUNT};

/// Counts fitted on training sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct BaselineStats {
    pub shape: RoutingShape,
    /// Co-activation horizons stored (`1..=horizon`).
    pub horizon: usize,
    /// `[n_moe, n_experts]`: how often each expert was chosen.
    pub frequency: Vec<f32>,
    /// `[horizon, n_moe, n_experts, n_experts]`: `[h-1][l][a][b]` counts tokens choosing
    /// `a` at layer `l` and `b` at layer `l + h`.
    pub coactivation: Vec<f32>,
    /// Token id -> `[n_experts]`: how often each first-MoE-layer expert was chosen for
    /// that token (tokens with unknown ids are not counted).
    pub first_layer_by_token: BTreeMap<u32, Vec<f32>>,
    /// Per token id and layer, expert counts (`None` in files written before it).
    pub token_table: Option<TokenTable>,
    /// Per layer, experts by falling frequency.
    frequency_order: Vec<Vec<u16>>,
    /// `[n_moe, n_experts]`: each layer's share of choices (sums to 1 per layer).
    shares: Vec<f32>,
}

impl BaselineStats {
    /// Empty counts.
    pub fn new(shape: RoutingShape, horizon: usize) -> Self {
        let (m, e) = (shape.n_moe, shape.n_experts);
        let mut s = BaselineStats {
            shape,
            horizon,
            frequency: vec![0.0; m * e],
            coactivation: vec![0.0; horizon * m * e * e],
            first_layer_by_token: BTreeMap::new(),
            token_table: Some(TokenTable::new(shape)),
            frequency_order: Vec::new(),
            shares: Vec::new(),
        };
        s.refresh_order();
        s
    }

    /// Counts the tokens `tokens` of `view`.
    pub fn add_tokens(&mut self, view: &TraceView<'_>, tokens: std::ops::Range<usize>) {
        let m = self.shape.n_moe;
        let mut layers = Vec::with_capacity(m);
        for t in tokens {
            layers.clear();
            layers.extend((0..m).map(|l| view.layer(t, l)));
            self.count_token(view.token[t], &layers);
        }
        self.refresh_order();
    }

    /// Counts one token's routing: `token` is its id (or [`datasets::UNKNOWN_TOKEN`]),
    /// `layers` each MoE layer's experts (`None`: not recorded).
    pub fn add_routing(&mut self, token: u32, layers: &[Option<&[u16]>]) {
        self.count_token(token, layers);
        let m = self.shape.n_moe.min(layers.len());
        for l in (0..m).filter(|&l| layers[l].is_some()) {
            self.refresh_layer(l);
        }
    }

    fn count_token(&mut self, token: u32, layers: &[Option<&[u16]>]) {
        let (m, e) = (self.shape.n_moe, self.shape.n_experts);
        let known = token != datasets::UNKNOWN_TOKEN;
        if let Some(Some(first)) = layers.first().filter(|_| known) {
            let row = self
                .first_layer_by_token
                .entry(token)
                .or_insert_with(|| vec![0.0; e]);
            for &x in *first {
                row[x as usize] += 1.0;
            }
        }
        for l in 0..m.min(layers.len()) {
            let Some(src) = layers[l] else {
                continue;
            };
            if let (Some(table), true) = (&mut self.token_table, known) {
                table.add(token, l, src);
            }
            for &a in src {
                self.frequency[l * e + a as usize] += 1.0;
            }
            for h in 1..=self.horizon.min(m - 1 - l) {
                let Some(dst) = layers.get(l + h).copied().flatten() else {
                    continue;
                };
                let base = ((h - 1) * m + l) * e * e;
                for &a in src {
                    for &b in dst {
                        self.coactivation[base + a as usize * e + b as usize] += 1.0;
                    }
                }
            }
        }
    }

    fn refresh_order(&mut self) {
        let (m, e) = (self.shape.n_moe, self.shape.n_experts);
        self.frequency_order.resize(m, Vec::new());
        self.shares.resize(m * e, 0.0);
        for l in 0..m {
            self.refresh_layer(l);
        }
    }

    /// Layer `l`'s frequency order and shares, from its counts.
    fn refresh_layer(&mut self, l: usize) {
        let e = self.shape.n_experts;
        let row = &self.frequency[l * e..(l + 1) * e];
        crate::metrics::rank_top(row, e, &mut self.frequency_order[l]);
        let total = row.iter().sum::<f32>();
        for (share, &c) in self.shares[l * e..(l + 1) * e].iter_mut().zip(row) {
            *share = if total > 0.0 {
                c / total
            } else {
                1.0 / e as f32
            };
        }
    }

    /// Layer `layer`'s share of choices per expert.
    pub fn share(&self, layer: usize) -> &[f32] {
        let e = self.shape.n_experts;
        &self.shares[layer * e..(layer + 1) * e]
    }

    /// Whether the token table is there (files written before it have none).
    pub fn has_token_table(&self) -> bool {
        self.token_table.is_some()
    }

    /// Token-table ranking of `layer` for id `token` (`None`: unknown id), `n` long:
    /// by the id's count, ties by the layer's frequency, then by the lower expert id; the
    /// frequency order when the id backs off (see [`crate::token_table`]).
    pub fn rank_token(&self, layer: usize, token: Option<u32>, n: usize, out: &mut Vec<u16>) {
        let mut counts = vec![0f32; self.shape.n_experts];
        let known = self
            .token_table
            .as_ref()
            .is_some_and(|t| t.rank_counts(token, layer, &mut counts));
        if !known {
            self.rank_frequency(layer, n, out);
            return;
        }
        let share = self.share(layer);
        out.clear();
        out.extend(0..self.shape.n_experts as u16);
        out.sort_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            counts[b]
                .total_cmp(&counts[a])
                .then(share[b].total_cmp(&share[a]))
                .then(a.cmp(&b))
        });
        out.truncate(n.min(self.shape.n_experts));
    }

    /// Log-odds that each expert of `layer` is chosen by a token of id `token` (`None`:
    /// unknown), smoothed towards the layer's frequency; `exclude` is taken out of the
    /// id's counts (leave-one-out for a training token).
    pub fn token_log_odds(
        &self,
        token: Option<u32>,
        layer: usize,
        exclude: Option<&[u16]>,
        out: &mut [f32],
    ) {
        let share = self.share(layer);
        match &self.token_table {
            Some(t) => t.log_odds(token, layer, exclude, share, out),
            None => {
                let k = self.shape.top_k as f32;
                for (o, f) in out.iter_mut().zip(share) {
                    *o = log_odds(k * f);
                }
            }
        }
    }

    /// Log-odds that each expert of layer `src + h` is chosen given the set `given` at
    /// layer `src`: the mean over `a` in `given` of `(C[a][b] + α k f(b)) / (N(a) + α)`.
    pub fn coactivation_log_odds(&self, src: usize, h: usize, given: &[u16], out: &mut [f32]) {
        let (m, e) = (self.shape.n_moe, self.shape.n_experts);
        let k = self.shape.top_k as f32;
        let base = ((h - 1) * m + src) * e * e;
        let share = self.share(src + h);
        out.iter_mut().for_each(|o| *o = 0.0);
        for &a in given {
            let n_a = self.frequency[src * e + a as usize];
            let row = &self.coactivation[base + a as usize * e..base + (a as usize + 1) * e];
            for ((o, c), f) in out.iter_mut().zip(row).zip(share) {
                *o += (c + PSEUDO_COUNT * k * f) / (n_a + PSEUDO_COUNT);
            }
        }
        let n = given.len().max(1) as f32;
        for (o, f) in out.iter_mut().zip(share) {
            *o = if given.is_empty() {
                log_odds(k * f)
            } else {
                log_odds(*o / n)
            };
        }
    }

    /// The combined count forecast of layer `src + h` for a token of id `token` whose
    /// layer `src` chose `given`: `logit q_token + logit q_coact - logit q_frequency`.
    pub fn combined_log_odds(
        &self,
        src: usize,
        h: usize,
        given: &[u16],
        token: Option<u32>,
        exclude: Option<&[u16]>,
        out: &mut [f32],
    ) {
        let k = self.shape.top_k as f32;
        let mut co = vec![0f32; out.len()];
        self.coactivation_log_odds(src, h, given, &mut co);
        self.token_log_odds(token, src + h, exclude, out);
        for ((o, c), f) in out.iter_mut().zip(&co).zip(self.share(src + h)) {
            *o += c - log_odds(k * f);
        }
    }

    /// Ranking of the combined count forecast (see [`Self::combined_log_odds`]).
    pub fn rank_combined(
        &self,
        src: usize,
        h: usize,
        given: &[u16],
        token: Option<u32>,
        n: usize,
        out: &mut Vec<u16>,
    ) {
        let mut scores = vec![0f32; self.shape.n_experts];
        self.combined_log_odds(src, h, given, token, None, &mut scores);
        crate::metrics::rank_top(&scores, n, out);
    }

    /// Appends experts in frequency order of `layer` not yet in `out`, up to `n`.
    fn complete(&self, layer: usize, n: usize, out: &mut Vec<u16>) {
        for &x in &self.frequency_order[layer] {
            if out.len() >= n {
                break;
            }
            if !out.contains(&x) {
                out.push(x);
            }
        }
    }

    /// Frequency ranking of `layer`, `n` long.
    pub fn rank_frequency(&self, layer: usize, n: usize, out: &mut Vec<u16>) {
        out.clear();
        self.complete(layer, n, out);
    }

    /// Previous-token ranking: `prev` (token `t-1`'s set at `layer`, if any) first.
    pub fn rank_previous(&self, layer: usize, prev: Option<&[u16]>, n: usize, out: &mut Vec<u16>) {
        out.clear();
        if let Some(p) = prev {
            out.extend_from_slice(&p[..p.len().min(n)]);
        }
        self.complete(layer, n, out);
    }

    /// Co-activation ranking of layer `src + h` given the set `given` at layer `src`.
    pub fn rank_coactivation(
        &self,
        src: usize,
        h: usize,
        given: &[u16],
        n: usize,
        out: &mut Vec<u16>,
    ) {
        let (m, e) = (self.shape.n_moe, self.shape.n_experts);
        let base = ((h - 1) * m + src) * e * e;
        let mut scores = vec![0f32; e];
        for &a in given {
            let row = &self.coactivation[base + a as usize * e..base + (a as usize + 1) * e];
            for (s, c) in scores.iter_mut().zip(row) {
                *s += c;
            }
        }
        // Frequency breaks ties between equal co-activation counts.
        let freq = &self.frequency[(src + h) * e..(src + h + 1) * e];
        let total: f32 = freq.iter().sum::<f32>().max(1.0);
        for (s, f) in scores.iter_mut().zip(freq) {
            *s += f / total * 1e-3;
        }
        crate::metrics::rank_top(&scores, n, out);
    }
}

mod io;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use safetensors::tensor::{Dtype, TensorView};

    use super::io::bytes_of;
    use super::*;
    use crate::error::Result;

    fn shape() -> RoutingShape {
        RoutingShape {
            n_moe: 2,
            n_experts: 4,
            top_k: 2,
        }
    }

    fn read(bytes: &[u8]) -> Result<BaselineStats> {
        BaselineStats::from_safetensors(bytes, shape(), Path::new("baselines.safetensors"))
    }

    /// Safetensors of `s`'s counts with the per-token tensors `tokens` and `counts`.
    fn file(s: &BaselineStats, tokens: Option<&[u32]>, counts: Option<(&[f32], usize)>) -> Vec<u8> {
        let (f, c) = (bytes_of(&s.frequency), bytes_of(&s.coactivation));
        let ids: Vec<u8> = tokens
            .unwrap_or(&[])
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        let rows = counts.map(|(c, _)| bytes_of(c)).unwrap_or_default();
        let mut views = vec![
            (
                "frequency",
                TensorView::new(Dtype::F32, vec![2, 4], &f).unwrap(),
            ),
            (
                "coactivation",
                TensorView::new(Dtype::F32, vec![1, 2, 4, 4], &c).unwrap(),
            ),
        ];
        if let Some(t) = tokens {
            views.push((
                "first_layer_tokens",
                TensorView::new(Dtype::U32, vec![t.len()], &ids).unwrap(),
            ));
        }
        if let Some((c, width)) = counts {
            let shape = vec![c.len() / width, width];
            views.push((
                "first_layer_counts",
                TensorView::new(Dtype::F32, shape, &rows).unwrap(),
            ));
        }
        safetensors::serialize(views, None).unwrap()
    }

    #[test]
    fn per_token_counts_round_trip_and_bad_files_are_refused_by_name() {
        let mut s = BaselineStats::new(shape(), 1);
        s.first_layer_by_token.insert(7, vec![2.0, 0.0, 2.0, 0.0]);
        s.first_layer_by_token
            .insert(90_000, vec![0.0, 1.0, 0.0, 1.0]);
        assert_eq!(read(&s.to_safetensors().unwrap()).unwrap(), s);
        // A file written before the per-token counts existed.
        assert!(read(&file(&s, None, None))
            .unwrap()
            .first_layer_by_token
            .is_empty());
        let refused = [
            file(&s, Some(&[7]), None),
            file(&s, None, Some((&[1.0; 4], 4))),
            file(&s, Some(&[7]), Some((&[1.0; 8], 8))),
            file(&s, Some(&[7, 7]), Some((&[1.0; 8], 4))),
            file(&s, Some(&[7]), Some((&[1.0, -1.0, 0.0, 0.0], 4))),
            file(&s, Some(&[7]), Some((&[1.0, f32::NAN, 0.0, 0.0], 4))),
            s.to_safetensors().unwrap()[..100].to_vec(),
        ];
        for bytes in refused {
            let err = read(&bytes).unwrap_err().to_string();
            assert!(err.contains("baselines.safetensors"), "{err}");
        }
    }

    #[test]
    fn first_layer_counts_skip_unknown_token_ids() {
        use datasets::synth::{synthetic_trace, SynthConfig};
        let mut trace = synthetic_trace(&SynthConfig {
            n_layers: 2,
            n_experts: 4,
            top_k: 2,
            sequences: 2,
            tokens_per_sequence: 20,
            ..SynthConfig::default()
        });
        let n = trace.n_tokens();
        for t in (0..n).step_by(3) {
            trace.token[t] = datasets::UNKNOWN_TOKEN;
        }
        let mut s = BaselineStats::new(shape(), 1);
        s.add_tokens(&trace.view(), 0..n);
        let view = trace.view();
        let mut want: BTreeMap<u32, Vec<f32>> = BTreeMap::new();
        for t in (0..n).filter(|t| t % 3 != 0) {
            let row = want.entry(view.token[t]).or_insert_with(|| vec![0.0; 4]);
            for &x in view.layer(t, 0).unwrap() {
                row[x as usize] += 1.0;
            }
        }
        assert!(!want.contains_key(&datasets::UNKNOWN_TOKEN));
        assert_eq!(s.first_layer_by_token, want);
        // The frequency baseline still counts every token.
        assert_eq!(s.frequency[..4].iter().sum::<f32>(), 2.0 * n as f32);
    }
}
