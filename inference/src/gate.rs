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

    /// Router input width.
    pub fn hidden(&self) -> usize {
        self.hidden
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
