//! The training toolkit both trainers share (the expert predictor here, the tiny MoE in
//! `tinymoe`): the learning-rate schedule and gradient clipping by global norm. Atomic
//! writes and resumable records are in [`crate::state`].

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

/// Linear warm-up to `lr` over `warmup` steps, then cosine decay to `lr * min_lr_ratio`
/// at step `total`. The warm-up is cut to `total - 1` steps so the peak is reached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupCosine {
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup: u64,
    pub total: u64,
}

impl WarmupCosine {
    /// Learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let warm = self.warmup.min(self.total.saturating_sub(1));
        if step < warm {
            return self.lr * (step + 1) as f64 / warm as f64;
        }
        let span = self.total.saturating_sub(warm).max(1) as f64;
        let p = ((step - warm) as f64 / span).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos)
    }
}

/// Scales the gradients of `model` so that their global L2 norm (over every parameter
/// tensor together) is at most `max_norm` (0: no clipping); returns the norm before.
pub fn clip_global_norm<M: Module>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<1>>,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = g.square().sum();
                self.sum = Some(match self.sum.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g * self.factor);
            }
        }
    }
    let mut norm = Norm { grads, sum: None };
    model.visit(&mut norm);
    let total = norm
        .sum
        .map_or(0.0, |s| (s.into_scalar::<f32>() as f64).sqrt());
    if max_norm > 0.0 && total > max_norm {
        let mut scale = Scale {
            grads,
            factor: max_norm / (total + 1e-6),
        };
        model.visit(&mut scale);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::WarmupCosine;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let s = WarmupCosine {
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup: 10,
            total: 110,
        };
        assert!((s.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55e-3).abs() < 1e-12);
        assert!((s.lr_at(110) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(500) - 1e-4).abs() < 1e-12);
        // A warm-up longer than the run still reaches the peak.
        let short = WarmupCosine { total: 4, ..s };
        assert!((short.lr_at(2) - 1e-3).abs() < 1e-12);
    }
}
