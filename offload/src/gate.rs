//! Training-free forecasts from the model's own gates: MoE layer `l + h`'s router applied
//! to layer `l`'s router input (the cross-layer gate, as FATE does for `h = 1`). The
//! residual stream changes little from one layer to the next, so a later gate read on an
//! earlier input ranks that later layer's experts well, one or more layers ahead.
//! [`NextTokenGate`] crosses the token boundary the same way: the LM head read at the
//! last MoE layer's router input forecasts the next token, hence its first layer's
//! experts, before the token is sampled.

use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, TensorData};
use predictor::baselines::BaselineStats;

use inference::error::{ModelError, Result};
use inference::layers::{to_vec, Dense};
use inference::models::MoeModel;
use inference::routing::RouterScoring;

/// Every MoE layer's gate, on the host.
#[derive(Debug, Clone)]
pub struct GateForecaster {
    /// Per MoE index: the weight transposed as the model holds it (`[hidden, experts]`,
    /// row-major) and the router's scoring.
    gates: Vec<(Vec<f32>, RouterScoring)>,
    hidden: usize,
    n_experts: usize,
}

impl GateForecaster {
    /// Copies the gates of `model` (which keeps them).
    pub fn new(model: &mut MoeModel) -> GateForecaster {
        let shape = model.shape();
        let gates = model
            .sparse_layers_mut()
            .into_iter()
            .map(|moe| (to_vec(moe.router.weight.clone()), moe.scoring.clone()))
            .collect();
        GateForecaster {
            gates,
            hidden: shape.hidden_size,
            n_experts: shape.n_experts,
        }
    }

    /// Loads the checkpoint in `dir` (on the CPU) and keeps its gates.
    pub fn open(dir: &std::path::Path) -> Result<GateForecaster> {
        let ck = inference::checkpoint::Checkpoint::open(dir)?;
        let mut model = MoeModel::load(&ck, &Default::default())?;
        Ok(GateForecaster::new(&mut model))
    }

    /// Number of MoE layers.
    pub fn n_moe(&self) -> usize {
        self.gates.len()
    }

    /// Checks that a trace's shape fits these gates.
    pub fn check(&self, n_moe: usize, n_experts: usize, input_dim: Option<u32>) -> Result<()> {
        check_trace(
            (self.n_moe(), self.n_experts, self.hidden),
            (n_moe, n_experts, input_dim),
        )
    }

    /// Selection scores of MoE layer `target`'s experts for router input `x` (of any
    /// layer): ranking them forecasts `target`'s routing.
    pub fn scores(&self, target: usize, x: &[f32]) -> Vec<f32> {
        let (w, scoring) = &self.gates[target];
        let e = self.n_experts;
        let mut logits = vec![0f32; e];
        for (i, &xi) in x.iter().enumerate().take(self.hidden) {
            let row = &w[i * e..(i + 1) * e];
            logits
                .iter_mut()
                .zip(row)
                .for_each(|(l, &wij)| *l += xi * wij);
        }
        scoring.selection_scores(&logits)
    }
}

/// The next token's first-MoE-layer experts, forecast before its id exists. The logit
/// lens: the last MoE layer's router input `x = norm_r(h)` is mapped back to the final
/// norm's output, `norm_f(h) = x ⊙ w_f / w_r` (both are RMS norms of the same `h`), and
/// the LM head turns it into a distribution `P(c)` over the next token; it misses only
/// the last MoE block's output and any layer after it. Each candidate `c` routes, at the
/// first MoE layer, like the layer's gate applied to its normalised embedding (its
/// routing before attention; exact for the pre-attention gate of a first layer at
/// decoder layer 0). Expert `e`'s score is `Σ_c P(c) [e ∈ topk(c)]`: the expected share
/// of the next token's top-k it takes. Routing observed for a candidate in training
/// traces can replace the indicator by its observed share ([`Self::with_counts`]).
#[derive(Debug, Clone)]
pub struct NextTokenGate {
    /// `w_f / w_r` per hidden unit (0 where `w_r` is 0).
    rescale: Tensor<1>,
    lm_head: Dense,
    /// `[vocab, n_experts]`: 1 where the expert is among the candidate's top-k (see
    /// [`Self::with_counts`] for observed rows).
    first_layer: Tensor<2>,
    top_k: usize,
    n_moe: usize,
    hidden: usize,
    n_experts: usize,
}

impl NextTokenGate {
    /// Vocabulary rows per batch while the first layer's table is built.
    const CHUNK: usize = 4096;

    /// Reads the lens weights of `model` and tabulates every token's first-layer experts.
    pub fn new(model: &MoeModel) -> Result<NextTokenGate> {
        let shape = model.shape();
        let parts = model.lens_parts();
        let (Some(first), Some(last)) = (parts.first_moe, parts.router_norms.last()) else {
            return Err(ModelError::Input("the model has no MoE layer".into()));
        };
        let (w_f, w_r) = (
            to_vec(parts.final_norm.weight.clone()),
            to_vec(last.weight.clone()),
        );
        let rescale: Vec<f32> = w_f
            .iter()
            .zip(&w_r)
            .map(|(&f, &r)| if r == 0.0 { 0.0 } else { f / r })
            .collect();
        let device = parts.embed.device();
        let [vocab, hidden] = parts.embed.dims();
        let (e, k) = (shape.n_experts, shape.top_k);
        let norm = parts.router_norms[0];
        let mut table = vec![0f32; vocab * e];
        for start in (0..vocab).step_by(Self::CHUNK) {
            let end = (start + Self::CHUNK).min(vocab);
            let x = norm.forward(parts.embed.clone().slice([start..end, 0..hidden]));
            let logits = to_vec(first.router.forward(x));
            for (i, row) in logits.chunks_exact(e).enumerate() {
                for x in first.scoring.route(row, k).ids {
                    table[(start + i) * e + x as usize] = 1.0;
                }
            }
        }
        Ok(NextTokenGate {
            rescale: Tensor::<1>::from_data(TensorData::new(rescale, [hidden]), &device),
            lm_head: parts.lm_head.clone(),
            first_layer: Tensor::<2>::from_data(TensorData::new(table, [vocab, e]), &device),
            top_k: k,
            n_moe: parts.router_norms.len(),
            hidden,
            n_experts: e,
        })
    }

    /// Scores of the first MoE layer's experts for the next token of each of `xs`, the
    /// last MoE layer's router inputs (`[T, hidden]` row-major); `[T, n_experts]`.
    pub fn scores(&self, xs: &[f32]) -> Vec<f32> {
        match self.lens(xs) {
            Some(p) => to_vec(p.matmul(self.first_layer.clone())),
            None => Vec::new(),
        }
    }

    /// Scores of each token's first-layer experts made before its id, from the token
    /// before it, over a trace: `n_tokens x n_experts`, NaN where the token starts a
    /// sequence or the token before has no router input at the last MoE layer.
    pub fn first_layer_before_id(&self, view: &datasets::TraceView<'_>) -> Vec<f32> {
        self.first_layer_before_id_with(&[], view).remove(0)
    }

    /// [`Self::first_layer_before_id`] of this lens and of each of `refined` (this lens
    /// after [`Self::with_counts`]: only their tables are read, under this lens's LM
    /// head), in that order; the next-token distribution is computed once for all.
    /// Panics if a table's shape differs from this lens's.
    pub fn first_layer_before_id_with(
        &self,
        refined: &[&NextTokenGate],
        view: &datasets::TraceView<'_>,
    ) -> Vec<Vec<f32>> {
        let (m, e) = (view.meta.n_moe(), self.n_experts);
        for g in refined {
            assert_eq!(
                g.first_layer.dims(),
                self.first_layer.dims(),
                "a refined lens of another model"
            );
        }
        let tables: Vec<&Tensor<2>> = std::iter::once(self)
            .chain(refined.iter().copied())
            .map(|g| &g.first_layer)
            .collect();
        let mut out = vec![vec![f32::NAN; view.n_tokens() * e]; tables.len()];
        for r in view.sequence_ranges() {
            let inputs: Vec<(usize, Vec<f32>)> = (r.start..r.end.saturating_sub(1))
                .filter_map(|t| view.router_input_f32(t, m - 1).map(|x| (t + 1, x)))
                .collect();
            for batch in inputs.chunks(256) {
                let xs: Vec<f32> = batch.iter().flat_map(|(_, x)| x.iter().copied()).collect();
                let Some(p) = self.lens(&xs) else { continue };
                for (table, out) in tables.iter().zip(&mut out) {
                    let scores = to_vec(p.clone().matmul((*table).clone()));
                    for ((t, _), row) in batch.iter().zip(scores.chunks_exact(e)) {
                        out[t * e..(t + 1) * e].copy_from_slice(row);
                    }
                }
            }
        }
        out
    }

    /// This lens with its candidates' first-layer rows refined by observed routing,
    /// if `stats` is given: `stats` counts, per token id, how often each first-layer
    /// expert was chosen for it (a predictor's training traces,
    /// [`BaselineStats::first_layer_by_token`]). A counted token's row becomes
    /// `(counts + g) / (n + 1)`, `g` its gate row and `n` its occurrences: the gate's
    /// routing before attention weighs as one observation, and the row still sums to k
    /// (its expected share of the next token's top-k). Ids outside the vocabulary are
    /// skipped; counts of another expert count or top-k are refused.
    pub fn with_counts(mut self, stats: Option<&BaselineStats>) -> Result<NextTokenGate> {
        let Some(stats) = stats else {
            return Ok(self);
        };
        let (e, k) = (self.n_experts, self.top_k);
        if (stats.shape.n_experts, stats.shape.top_k) != (e, k) {
            return Err(ModelError::Input(format!(
                "the predictor's per-token counts are of {} experts (top-{}), the model routes top-{k} of {e}",
                stats.shape.n_experts, stats.shape.top_k
            )));
        }
        let mut table = to_vec(self.first_layer.clone());
        let vocab = table.len() / e;
        for (&token, c) in &stats.first_layer_by_token {
            let t = token as usize;
            if t >= vocab {
                continue;
            }
            let n = c.iter().sum::<f32>() / k as f32;
            for (g, &ci) in table[t * e..(t + 1) * e].iter_mut().zip(c) {
                *g = (ci + *g) / (n + 1.0);
            }
        }
        let dims = self.first_layer.dims();
        self.first_layer =
            Tensor::<2>::from_data(TensorData::new(table, dims), &self.first_layer.device());
        Ok(self)
    }

    /// The lens's next-token distribution for each of `xs`; `[T, vocab]`.
    pub fn next_token_probs(&self, xs: &[f32]) -> Vec<f32> {
        self.lens(xs).map(to_vec).unwrap_or_default()
    }

    /// The first MoE layer's experts of `token`: those its row scores above 0 (the
    /// gate's top-k before attention, ascending, and any observed ones after
    /// [`Self::with_counts`]); none for a token outside the vocabulary.
    pub fn first_layer_experts(&self, token: u32) -> Vec<u16> {
        let row = self.first_layer_row(token).unwrap_or_default();
        (0..row.len() as u16)
            .filter(|&x| row[x as usize] > 0.0)
            .collect()
    }

    /// `token`'s row of the first-layer table (`[n_experts]`, summing to k), if it is in
    /// the vocabulary.
    pub fn first_layer_row(&self, token: u32) -> Option<Vec<f32>> {
        let t = token as usize;
        (t < self.first_layer.dims()[0]).then(|| {
            to_vec(
                self.first_layer
                    .clone()
                    .slice([t..t + 1, 0..self.n_experts]),
            )
        })
    }

    fn lens(&self, xs: &[f32]) -> Option<Tensor<2>> {
        let t = xs.len() / self.hidden;
        if t == 0 {
            return None;
        }
        let device = self.rescale.device();
        let x = Tensor::<2>::from_data(
            TensorData::new(xs[..t * self.hidden].to_vec(), [t, self.hidden]),
            &device,
        );
        let x = x * self.rescale.clone().unsqueeze::<2>();
        Some(softmax(self.lm_head.forward(x), 1))
    }

    /// Checks that a trace's shape fits this model.
    pub fn check(&self, n_moe: usize, n_experts: usize, input_dim: Option<u32>) -> Result<()> {
        check_trace(
            (self.n_moe, self.n_experts, self.hidden),
            (n_moe, n_experts, input_dim),
        )
    }
}

/// Checks a trace's (MoE layers, experts, router input width) against a model's.
fn check_trace(model: (usize, usize, usize), trace: (usize, usize, Option<u32>)) -> Result<()> {
    let ((m, e, hidden), (n_moe, n_experts, input_dim)) = (model, trace);
    if (n_moe, n_experts) != (m, e) {
        return Err(ModelError::Input(format!(
            "the model has {m} MoE layers x {e} experts, the trace {n_moe} x {n_experts}"
        )));
    }
    match input_dim {
        Some(d) if d as usize == hidden => Ok(()),
        Some(d) => Err(ModelError::Input(format!(
            "the trace's router inputs have {d} values, the model's gates read {hidden}"
        ))),
        None => Err(ModelError::Input(
            "the trace has no router inputs: collect it with `moecast collect --hidden-states`"
                .into(),
        )),
    }
}

/// Collects the pre-attention gate's logits of every MoE layer, `[T, n_experts]` rows.
struct PreAttention {
    moe_index: std::collections::HashMap<usize, usize>,
    n_experts: usize,
    /// `[position][moe index]` logits of the sequence being replayed.
    rows: Vec<Vec<Option<Vec<f32>>>>,
}

impl inference::routing::RoutingObserver for PreAttention {
    fn on_routing(&mut self, _: usize, _: usize, _: &[inference::routing::RouteDecision]) {}

    fn wants_pre_attention_logits(&self) -> bool {
        true
    }

    fn on_pre_attention_logits(
        &mut self,
        layer: usize,
        first_pos: usize,
        logits: &[f32],
        e: usize,
    ) {
        let Some(&m) = self.moe_index.get(&layer) else {
            return;
        };
        for (i, row) in logits.chunks_exact(e).enumerate() {
            self.rows[first_pos + i][m] = Some(row.to_vec());
        }
    }
}

/// The pre-attention gate over a trace: every sequence whose token ids are known is run
/// through `model` (teacher-forced, one batch), and MoE layer `l`'s router is applied to
/// the layer's input before attention (normalised by the layer's pre-MoE norm). Returns
/// `n_tokens x n_moe x n_experts` logits, NaN where a sequence has unknown tokens.
pub fn pre_attention_logits(model: &MoeModel, view: &datasets::TraceView<'_>) -> Result<Vec<f32>> {
    let shape = model.shape();
    let (m, e) = (view.meta.n_moe(), view.meta.n_experts as usize);
    if shape
        .moe_layers
        .iter()
        .map(|&l| l as u32)
        .collect::<Vec<_>>()
        != view.meta.moe_layers
        || shape.n_experts != e
    {
        return Err(ModelError::Input(format!(
            "the model's MoE layers {:?} x {} experts do not match the trace's {:?} x {e}",
            shape.moe_layers, shape.n_experts, view.meta.moe_layers
        )));
    }
    let mut out = vec![f32::NAN; view.n_tokens() * m * e];
    let mut obs = PreAttention {
        moe_index: shape.moe_index(),
        n_experts: e,
        rows: Vec::new(),
    };
    for r in view.sequence_ranges() {
        let tokens = &view.token[r.clone()];
        if tokens.contains(&datasets::UNKNOWN_TOKEN) {
            continue;
        }
        obs.rows = vec![vec![None; m]; tokens.len()];
        model.forward(tokens, &mut model.new_cache(), &mut obs)?;
        for (i, per) in obs.rows.iter().enumerate() {
            for (l, row) in per.iter().enumerate() {
                if let Some(row) = row {
                    let at = ((r.start + i) * m + l) * obs.n_experts;
                    out[at..at + e].copy_from_slice(row);
                }
            }
        }
    }
    Ok(out)
}

/// The model's own forecasts as `moecast eval` baselines, and notes on what is missing.
pub struct ModelBaselines {
    /// The cross-layer gate (when every trace carries router inputs of the gates' width).
    pub gate: Option<predictor::GateBaseline>,
    /// The pre-attention gate.
    pub early: predictor::EarlyScores,
    /// The logit lens's forecast of each token's first layer before its id (and refined
    /// by the predictor's per-token counts), for predictors that forecast before the id.
    pub before_id: Vec<predictor::EarlyScores>,
    pub notes: Vec<String>,
}

/// Loads the checkpoint at `dir` and scores `set` with its gates; `before_id` adds the
/// logit lens (router inputs too), refined by `counts` when given.
pub fn model_baselines(
    dir: &std::path::Path,
    set: &datasets::examples::ExampleSet,
    before_id: bool,
    counts: Option<&BaselineStats>,
) -> Result<ModelBaselines> {
    let ck = inference::Checkpoint::open(dir)?;
    let mut model = MoeModel::load(&ck, &Default::default())?;
    let g = GateForecaster::new(&mut model);
    let mut notes = Vec::new();
    // The gate and the lens need router inputs of the gates' width in every trace.
    let inputs_fit = (0..set.paths().len()).try_for_each(|i| {
        let meta = &set.view(i).meta;
        g.check(
            meta.n_moe(),
            meta.n_experts as usize,
            meta.router_input_dim(),
        )
        .map_err(|e| format!("{}: {e}", set.paths()[i].display()))
    });
    let gate = match &inputs_fit {
        Ok(()) => {
            let g = std::sync::Arc::new(g);
            Some(predictor::GateBaseline {
                name: "cross-layer gate".into(),
                scores: std::sync::Arc::new(move |target, x| g.scores(target, x)),
            })
        }
        Err(e) => {
            notes.push(format!("no cross-layer gate baseline: {e}"));
            None
        }
    };
    let per_trace = (0..set.paths().len())
        .map(|i| {
            pre_attention_logits(&model, &set.view(i))
                .map_err(|e| ModelError::file(&set.paths()[i], e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let early = predictor::EarlyScores {
        name: "pre-attention gate".into(),
        per_trace,
    };
    // The lens reads the same router inputs as the cross-layer gate: with the gate's
    // table of candidates, and refined by the predictor's per-token counts if it has them.
    let mut before = Vec::new();
    if before_id && inputs_fit.is_ok() {
        let lens = NextTokenGate::new(&model)?;
        let refined = match counts {
            Some(_) => vec![("lens + counts (layer 0)", lens.clone().with_counts(counts)?)],
            None => Vec::new(),
        };
        before = std::iter::once("lens (layer 0)")
            .chain(refined.iter().map(|(name, _)| *name))
            .map(|name| predictor::EarlyScores {
                name: name.into(),
                per_trace: Vec::new(),
            })
            .collect();
        let gates: Vec<&NextTokenGate> = refined.iter().map(|(_, g)| g).collect();
        for i in 0..set.paths().len() {
            let scores = lens.first_layer_before_id_with(&gates, &set.view(i));
            for (b, s) in before.iter_mut().zip(scores) {
                b.per_trace.push(s);
            }
        }
    }
    Ok(ModelBaselines {
        gate,
        early,
        before_id: before,
        notes,
    })
}
