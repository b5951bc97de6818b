//! A training or evaluation batch as tensors, and the predictor's loss over it: every
//! query's logits for every position, and the masked binary cross-entropy of the
//! routed experts.

use burn::tensor::{Device, Int, Tensor, TensorData};

use datasets::examples::{RoutingShape, WindowBatch};

use crate::config::Query;
use crate::model::ExpertPredictor;

/// Binary cross-entropy with logits, `pos_weight` on the positive class, summed over
/// the entries where `mask` is 1 and divided by `denominator`, or by their count when it
/// is `None` (the mean): `-(w y log σ(z) + (1-y) log(1-σ(z)))`.
pub fn masked_bce(
    logits: Tensor<2>,
    targets: Tensor<2>,
    mask: Tensor<2>,
    pos_weight: f64,
    denominator: Option<f64>,
) -> Tensor<1> {
    use burn::tensor::activation::log_sigmoid;
    let log_p = log_sigmoid(logits.clone());
    let log_not_p = log_p.clone() - logits;
    let loss = targets.clone() * log_p * (-pos_weight) - (targets.neg() + 1.0) * log_not_p;
    let sum = (loss * mask.clone()).sum();
    match denominator {
        Some(d) => sum / d.max(1.0),
        None => sum / mask.sum().clamp_min(1.0),
    }
}

/// One [`WindowBatch`] as tensors, positions flattened to rows.
pub struct BatchTensors {
    /// `[b, s]` token buckets.
    pub tokens: Tensor<2, Int>,
    /// `[b, s, width]` routing of the previous token.
    pub prev_routing: Tensor<3>,
    /// `[b*s, width]` routing of the token (targets, and the known layers of queries).
    pub routing: Tensor<2>,
    /// `[b*s, n_moe]` 1 where the layer is a target.
    pub mask: Tensor<2>,
    /// `[n_moe, b*s, router_input_dim]` router inputs, when the batch has them.
    pub router_inputs: Option<Tensor<3>>,
    /// Count priors of the queries the batch is run with, `[b*s, horizon * E]` each
    /// (empty for predictors without the prior path), see [`crate::prior`].
    pub priors: Vec<Tensor<2>>,
    /// Seed of the dropout masks (see [`crate::model::dropout`]); `None`: Burn's device
    /// generator.
    pub dropout_seed: Option<u64>,
}

impl BatchTensors {
    /// Uploads `batch` to `device`.
    pub fn new(batch: &WindowBatch, routing: RoutingShape, device: &Device) -> Self {
        let (b, s, w) = (batch.batch, batch.len, routing.width());
        BatchTensors {
            tokens: Tensor::from_data(TensorData::new(batch.tokens.clone(), [b, s]), device),
            prev_routing: Tensor::from_data(
                TensorData::new(batch.prev_routing.clone(), [b, s, w]),
                device,
            ),
            routing: Tensor::from_data(TensorData::new(batch.routing.clone(), [b * s, w]), device),
            mask: Tensor::from_data(
                TensorData::new(batch.target_mask.clone(), [b * s, routing.n_moe]),
                device,
            ),
            router_inputs: batch.router_inputs.as_ref().map(|x| {
                let dim = x.len() / (b * s * routing.n_moe).max(1);
                Tensor::<3>::from_data(
                    TensorData::new(x.clone(), [b * s, routing.n_moe, dim]),
                    device,
                )
                .swap_dims(0, 1)
            }),
            priors: Vec::new(),
            dropout_seed: None,
        }
    }

    /// Draws this batch's dropout masks from `seed` (see [`crate::model::dropout`]).
    pub fn with_dropout_seed(mut self, seed: u64) -> Self {
        self.dropout_seed = Some(seed);
        self
    }

    /// Adds the count priors of `queries` (see [`crate::prior::batch_priors`]) when
    /// `model` has the prior path.
    #[allow(clippy::too_many_arguments)]
    pub fn with_priors(
        mut self,
        model: &ExpertPredictor,
        stats: Option<&crate::baselines::BaselineStats>,
        set: &datasets::examples::ExampleSet,
        batch: &WindowBatch,
        queries: &[Query],
        leave_one_out: bool,
    ) -> crate::Result<Self> {
        let cfg = &model.config;
        if !cfg.token_prior {
            return Ok(self);
        }
        let stats = stats.ok_or_else(|| {
            crate::PredictorError::Invalid(
                "this predictor adds the token table's prior: its baselines.safetensors is needed"
                    .into(),
            )
        })?;
        let device = self.routing.device();
        let [n, _] = self.routing.dims();
        let e = cfg.routing.n_experts;
        let unknown = datasets::examples::token_bucket(datasets::UNKNOWN_TOKEN, cfg.token_buckets);
        let priors = crate::prior::batch_priors(stats, set, batch, queries, leave_one_out, unknown);
        self.priors = queries
            .iter()
            .zip(priors)
            .map(|(q, p)| Tensor::from_data(TensorData::new(p, [n, q.horizon * e]), &device))
            .collect();
        Ok(self)
    }

    /// Targets and mask of `query`, `[b*s, horizon * n_experts]` each.
    pub fn targets(&self, query: Query, n_experts: usize) -> (Tensor<2>, Tensor<2>) {
        let [n, _] = self.routing.dims();
        let y = self
            .routing
            .clone()
            .narrow(1, query.known * n_experts, query.horizon * n_experts);
        let m = self
            .mask
            .clone()
            .narrow(1, query.known, query.horizon)
            .unsqueeze_dim::<3>(2)
            .expand([n, query.horizon, n_experts])
            .reshape([n, query.horizon * n_experts]);
        (y, m)
    }
}

impl ExpertPredictor {
    /// Logits of every query for every position of the batch, `[b*s, horizon * E]` each.
    pub fn forward_queries(&self, bt: &BatchTensors, queries: &[Query]) -> Vec<Tensor<2>> {
        let [n, _] = bt.routing.dims();
        let d = self.config.d_model;
        let h = self
            .encode(bt.tokens.clone(), bt.prev_routing.clone(), bt.dropout_seed)
            .reshape([n, d]);
        let prefix = self.known_prefix(bt.routing.clone());
        queries
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let ids = prefix.clone().narrow(0, q.known, 1).reshape([n, d]);
                let x = match (&bt.router_inputs, q.known) {
                    (Some(x), known) if known > 0 => {
                        let dim = x.dims()[2];
                        Some(x.clone().narrow(0, known - 1, 1).reshape([n, dim]))
                    }
                    _ => None,
                };
                let prior = bt.priors.get(i).cloned();
                self.query_logits(h.clone(), self.query_prefix(ids, x, *q), prior, *q)
            })
            .collect()
    }

    /// Mean masked BCE over `queries` (see [`masked_bce`]). With `denominators` (one
    /// per query: its target count in the whole batch, see
    /// [`crate::step::query_denominators`]) `bt` may be one shard of a batch: the
    /// shards' losses then add up to the batch's.
    pub fn loss(
        &self,
        bt: &BatchTensors,
        queries: &[Query],
        pos_weight: f64,
        denominators: Option<&[f64]>,
    ) -> Tensor<1> {
        let e = self.config.routing.n_experts;
        let logits = self.forward_queries(bt, queries);
        let mut total: Option<Tensor<1>> = None;
        for (i, (q, z)) in queries.iter().zip(logits).enumerate() {
            let (y, m) = bt.targets(*q, e);
            let l = masked_bce(z, y, m, pos_weight, denominators.map(|d| d[i]));
            total = Some(match total {
                Some(t) => t + l,
                None => l,
            });
        }
        total.expect("at least one query") / queries.len() as f64
    }
}
