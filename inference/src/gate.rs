//! Training-free forecasts from the model's own gates: MoE layer `l + h`'s router applied
//! to layer `l`'s router input (the cross-layer gate, as FATE does for `h = 1`). The
//! residual stream changes little from one layer to the next, so a later gate read on an
//! earlier input ranks that later layer's experts well, one or more layers ahead.

use crate::error::{ModelError, Result};
use crate::layers::to_vec;
use crate::models::MoeModel;
use crate::routing::RouterScoring;

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
        let ck = crate::checkpoint::Checkpoint::open(dir)?;
        let mut model = MoeModel::load(&ck, &Default::default())?;
        Ok(GateForecaster::new(&mut model))
    }

    /// Number of MoE layers.
    pub fn n_moe(&self) -> usize {
        self.gates.len()
    }

    /// Checks that a trace's shape fits these gates.
    pub fn check(&self, n_moe: usize, n_experts: usize, input_dim: Option<u32>) -> Result<()> {
        if (n_moe, n_experts) != (self.n_moe(), self.n_experts) {
            return Err(ModelError::Input(format!(
                "the model has {} MoE layers x {} experts, the trace {n_moe} x {n_experts}",
                self.n_moe(),
                self.n_experts
            )));
        }
        match input_dim {
            Some(d) if d as usize == self.hidden => Ok(()),
            Some(d) => Err(ModelError::Input(format!(
                "the trace's router inputs have {d} values, the model's gates read {}",
                self.hidden
            ))),
            None => Err(ModelError::Input(
                "the trace has no router inputs: collect it with `moecast collect --hidden-states`"
                    .into(),
            )),
        }
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

/// Collects the pre-attention gate's logits of every MoE layer, `[T, n_experts]` rows.
struct PreAttention {
    moe_index: std::collections::HashMap<usize, usize>,
    n_experts: usize,
    /// `[position][moe index]` logits of the sequence being replayed.
    rows: Vec<Vec<Option<Vec<f32>>>>,
}

impl crate::routing::RoutingObserver for PreAttention {
    fn on_routing(&mut self, _: usize, _: usize, _: &[crate::routing::RouteDecision]) {}

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
