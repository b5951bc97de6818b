//! One training step's loss and gradients, data-parallel over CPU threads.
//!
//! Burn's CPU backend parallelises inside an operation only when the tensor is large, so
//! a step of the predictor kept about 1.2 of 2 cores busy. Here the batch's windows are
//! cut into shards ([`WindowBatch::split`]); each shard runs forward and backward on its
//! own rayon thread, through its own autodiff leaves of the same weights
//! ([`Module::fork`]: same parameter ids, separate graphs), and the shards' gradients
//! are summed in shard order. Each shard's loss is divided by the whole batch's target
//! count ([`query_denominators`]), so the sum is the batch's loss and gradient for any
//! shard count (up to float rounding): a run is reproducible for a given shard count.

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use datasets::examples::{RoutingShape, WindowBatch};
use rayon::prelude::*;

use crate::batch::BatchTensors;
use crate::config::Query;
use crate::device::BackendKind;
use crate::model::ExpertPredictor;

/// Shards of a step on `kind`: `requested`, or with 0 one per thread of the CPU pool
/// (rayon's, `RAYON_NUM_THREADS`) on the CPU backends and 1 on a GPU; never more than
/// the batch has windows.
pub fn resolve_shards(requested: usize, kind: BackendKind, batch_windows: usize) -> usize {
    let shards = match requested {
        0 if kind.is_cpu() => rayon::current_num_threads(),
        0 => 1,
        n => n,
    };
    shards.clamp(1, batch_windows.max(1))
}

/// Each query's target count in the whole `batch` (entries of its targets where the
/// mask is 1, at least 1): the denominators of the batch's mean loss.
pub fn query_denominators(batch: &WindowBatch, queries: &[Query], shape: RoutingShape) -> Vec<f64> {
    queries
        .iter()
        .map(|q| {
            let layers: f64 = batch
                .target_mask
                .chunks(shape.n_moe)
                .map(|row| row[q.known..q.known + q.horizon].iter().sum::<f32>() as f64)
                .sum();
            (layers * shape.n_experts as f64).max(1.0)
        })
        .collect()
}

/// The batch's loss (mean masked BCE over `queries`) and its gradients, from `shards`
/// (the batch split by [`WindowBatch::split`], as tensors) run in parallel;
/// `denominators` from [`query_denominators`] of the whole batch.
pub fn loss_and_gradients(
    model: &ExpertPredictor,
    shards: &[BatchTensors],
    queries: &[Query],
    pos_weight: f64,
    denominators: &[f64],
) -> (f64, GradientsParams) {
    let per_shard: Vec<(f64, GradientsParams)> = shards
        .par_iter()
        .map(|bt| {
            let device = bt.routing.device();
            let leaves = model.clone().fork(&device);
            let loss = leaves.loss(bt, queries, pos_weight, Some(denominators));
            let grads = GradientsParams::from_grads(loss.backward(), &leaves);
            (loss.into_scalar::<f32>() as f64, grads)
        })
        .collect();
    let mut total = 0.0;
    let mut sum = GradientsAccumulator::<ExpertPredictor>::new();
    for (loss, grads) in per_shard {
        total += loss;
        sum.accumulate(model, grads);
    }
    (total, sum.grads())
}
