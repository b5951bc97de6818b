//! The count prior the predictor adds to its logits (its prior path): for the next-token
//! query the token table's smoothed log-odds of each layer's experts given the token id,
//! and for a lookahead query the combined count forecast (token table and co-activation
//! with the last known layer, [`BaselineStats::combined_log_odds`]). A token whose id is
//! unknown (not sampled yet, or hidden by token-id dropout) gets the layer frequency.
//!
//! Training tokens see leave-one-out counts (their own routing taken out of their id's
//! row), so the prior is as informative in training as on tokens never counted.

use datasets::examples::{ExampleSet, WindowBatch};

use crate::baselines::BaselineStats;
use crate::config::Query;

/// The prior of `query` for one token: `token` its id (`None`: unknown), `layers` its
/// routing (the known layers are read; with `leave_one_out` the targets are taken out of
/// the id's counts). Writes `[horizon, n_experts]` log-odds into `out`.
pub fn query_prior(
    stats: &BaselineStats,
    token: Option<u32>,
    layers: &[Option<&[u16]>],
    query: Query,
    leave_one_out: bool,
    out: &mut [f32],
) {
    let e = stats.shape.n_experts;
    let given = query
        .known
        .checked_sub(1)
        .and_then(|src| Some((src, layers.get(src).copied().flatten()?)));
    for hh in 0..query.horizon {
        let layer = query.known + hh;
        let row = &mut out[hh * e..(hh + 1) * e];
        let exclude = if leave_one_out {
            layers.get(layer).copied().flatten()
        } else {
            None
        };
        match given {
            Some((src, g)) if layer - src <= stats.horizon => {
                stats.combined_log_odds(src, layer - src, g, token, exclude, row)
            }
            _ => stats.token_log_odds(token, layer, exclude, row),
        }
    }
}

/// [`query_prior`] for every position of `batch` and every query: one
/// `[rows, horizon * n_experts]` array per query (zeros on padding). A position whose
/// token bucket is the unknown row (`unknown_bucket`) is forecast as an unknown id.
pub fn batch_priors(
    stats: &BaselineStats,
    set: &ExampleSet,
    batch: &WindowBatch,
    queries: &[Query],
    leave_one_out: bool,
    unknown_bucket: i64,
) -> Vec<Vec<f32>> {
    let (m, e) = (stats.shape.n_moe, stats.shape.n_experts);
    let rows = batch.batch * batch.len;
    let mut out: Vec<Vec<f32>> = queries
        .iter()
        .map(|q| vec![0f32; rows * q.horizon * e])
        .collect();
    for (row, &t) in batch.token_index.iter().enumerate() {
        if t == usize::MAX {
            continue;
        }
        let view = set.view(batch.trace[row / batch.len]);
        let token = (batch.tokens[row] != unknown_bucket
            && view.token[t] != datasets::UNKNOWN_TOKEN)
            .then_some(view.token[t]);
        let layers: Vec<Option<&[u16]>> = (0..m).map(|l| view.layer(t, l)).collect();
        for (q, dst) in queries.iter().zip(out.iter_mut()) {
            let w = q.horizon * e;
            query_prior(
                stats,
                token,
                &layers,
                *q,
                leave_one_out,
                &mut dst[row * w..(row + 1) * w],
            );
        }
    }
    out
}
