//! Rotary position embeddings configured the way transformers configures them
//! (`rope_parameters`, or the older `rope_theta` + `rope_scaling`): plain RoPE and YaRN,
//! with YaRN's attention factor folded into the cos / sin tables.
//!
//! Frequencies are computed in f32 like transformers' `_compute_yarn_parameters` and
//! `compute_default_rope_parameters`, so the tables match its values closely.

use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;

/// The rope fields of `config.json` (`rope_parameters` or legacy `rope_scaling`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_type: Option<String>,
    /// Older spelling of `rope_type`.
    #[serde(default, rename = "type")]
    pub legacy_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub attention_factor: Option<f64>,
    #[serde(default)]
    pub beta_fast: Option<f64>,
    #[serde(default)]
    pub beta_slow: Option<f64>,
    #[serde(default)]
    pub mscale: Option<f64>,
    #[serde(default)]
    pub mscale_all_dim: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<f64>,
    #[serde(default)]
    pub truncate: Option<bool>,
}

impl RopeParameters {
    /// `rope_type`, `"default"` when absent.
    pub fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .unwrap_or("default")
    }
}

/// DeepSeek's `yarn_get_mscale`: `0.1 * mscale * ln(scale) + 1` (1 when `scale <= 1`).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// Inverse frequencies of the rotary dimension pairs and the factor cos / sin carry.
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryEmbedding {
    /// One per pair, `dim / 2` values.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 for plain RoPE).
    pub attention_factor: f32,
}

impl RotaryEmbedding {
    /// Builds the embedding for a rotary dimension `dim`. `params` is `rope_parameters`
    /// (or `rope_scaling`), `rope_theta` the top-level field of older configs and
    /// `default_theta` the architecture's default. Errors name unsupported rope types.
    pub fn from_config(
        params: Option<&RopeParameters>,
        rope_theta: Option<f64>,
        default_theta: f64,
        dim: usize,
        max_position_embeddings: usize,
    ) -> Result<RotaryEmbedding, String> {
        let empty = RopeParameters::default();
        let p = params.unwrap_or(&empty);
        let base = p.rope_theta.or(rope_theta).unwrap_or(default_theta) as f32;
        if dim == 0 || !dim.is_multiple_of(2) {
            return Err(format!("rotary dimension {dim} must be even and positive"));
        }
        let pos_freqs: Vec<f32> = (0..dim / 2)
            .map(|i| base.powf((2 * i) as f32 / dim as f32))
            .collect();
        match p.kind() {
            "default" => Ok(RotaryEmbedding {
                inv_freq: pos_freqs.iter().map(|f| 1.0 / f).collect(),
                attention_factor: 1.0,
            }),
            "yarn" => {
                let orig = p
                    .original_max_position_embeddings
                    .unwrap_or(max_position_embeddings as f64);
                let factor = p.factor.unwrap_or(max_position_embeddings as f64 / orig);
                let attention_factor =
                    p.attention_factor
                        .unwrap_or_else(|| match (p.mscale, p.mscale_all_dim) {
                            (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                                yarn_mscale(factor, m) / yarn_mscale(factor, a)
                            }
                            _ => yarn_mscale(factor, 1.0),
                        });
                let beta_fast = p.beta_fast.filter(|&b| b != 0.0).unwrap_or(32.0);
                let beta_slow = p.beta_slow.filter(|&b| b != 0.0).unwrap_or(1.0);
                let correction_dim = |rot: f64| {
                    dim as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * (base as f64).ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if p.truncate.unwrap_or(true) {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(dim as f64 - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                let inv_freq = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, &pf)| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        let interp = 1.0 / (factor as f32 * pf);
                        interp * (1.0 - extrapolation) + (1.0 / pf) * extrapolation
                    })
                    .collect();
                Ok(RotaryEmbedding {
                    inv_freq,
                    attention_factor: attention_factor as f32,
                })
            }
            other => Err(format!(
                "rope type '{other}' is not supported (default, yarn)"
            )),
        }
    }

    /// Rotary dimension.
    pub fn dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// `cos`, `sin` of shape `[1, T, dim]` for positions `start..start + T`, each half
    /// repeating the per-pair angles (the "rotate half" layout of
    /// [`apply_rope`](crate::layers::apply_rope)), scaled by the attention factor.
    pub fn tables(&self, start: usize, t: usize, device: &Device) -> (Tensor<3>, Tensor<3>) {
        let dim = self.dim();
        let mut cos = Vec::with_capacity(t * dim);
        let mut sin = Vec::with_capacity(t * dim);
        for p in start..start + t {
            let angles: Vec<f64> = self
                .inv_freq
                .iter()
                .map(|&f| (p as f32 * f) as f64)
                .collect();
            for _ in 0..2 {
                cos.extend(
                    angles
                        .iter()
                        .map(|a| a.cos() as f32 * self.attention_factor),
                );
                sin.extend(
                    angles
                        .iter()
                        .map(|a| a.sin() as f32 * self.attention_factor),
                );
            }
        }
        let shape = [1, t, dim];
        (
            Tensor::<3>::from_data(TensorData::new(cos, shape), device),
            Tensor::<3>::from_data(TensorData::new(sin, shape), device),
        )
    }
}

/// Reorders the last dimension of `x` from interleaved pairs `(x0, x1), (x2, x3), ...`
/// to `[x0, x2, ..., x1, x3, ...]`, so interleaved RoPE (DeepSeek) becomes the
/// rotate-half form. Applied to both q and k it leaves every q·k unchanged.
pub fn deinterleave(x: Tensor<3>) -> Tensor<3> {
    let [a, b, d] = x.dims();
    x.reshape([a, b, d / 2, 2])
        .swap_dims(2, 3)
        .reshape([a, b, d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rope_frequencies() {
        let r = RotaryEmbedding::from_config(None, Some(10_000.0), 1.0, 8, 128).unwrap();
        assert_eq!(r.inv_freq.len(), 4);
        assert!((r.inv_freq[0] - 1.0).abs() < 1e-7);
        assert!((r.inv_freq[1] - 0.1).abs() < 1e-6);
        assert_eq!(r.attention_factor, 1.0);
    }

    fn close(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-3), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn yarn_matches_transformers() {
        // reference values printed by transformers 5.24 ROPE_INIT_FUNCTIONS["yarn"]
        // for the gpt_oss fixture (theta 150000, head_dim 8, factor 32, original 4096,
        // beta 32/1), with truncate false (as published) and true.
        let mut p = RopeParameters {
            rope_type: Some("yarn".into()),
            rope_theta: Some(150_000.0),
            factor: Some(32.0),
            beta_fast: Some(32.0),
            beta_slow: Some(1.0),
            original_max_position_embeddings: Some(4096.0),
            truncate: Some(false),
            ..Default::default()
        };
        let r = RotaryEmbedding::from_config(Some(&p), None, 1.0, 8, 131_072).unwrap();
        close(
            &r.inv_freq,
            &[1.0, 0.050813273, 0.00045648392, 4.0999785e-6],
        );
        assert!((r.attention_factor - 1.3465736).abs() < 1e-6);
        p.truncate = Some(true);
        let r = RotaryEmbedding::from_config(Some(&p), None, 1.0, 8, 131_072).unwrap();
        close(&r.inv_freq, &[1.0, 0.050813273, 0.0013313381, 4.0999785e-6]);
        // DeepSeek-V3 style: mscale == mscale_all_dim gives attention factor 1
        let d = RopeParameters {
            legacy_type: Some("yarn".into()),
            factor: Some(40.0),
            mscale: Some(1.0),
            mscale_all_dim: Some(1.0),
            original_max_position_embeddings: Some(4096.0),
            ..Default::default()
        };
        let r = RotaryEmbedding::from_config(Some(&d), Some(10_000.0), 1.0, 8, 128).unwrap();
        close(&r.inv_freq, &[1.0, 0.1, 0.005125, 2.5e-5]);
        assert_eq!(r.attention_factor, 1.0);
        let unsupported = RopeParameters {
            rope_type: Some("longrope".into()),
            ..Default::default()
        };
        assert!(RotaryEmbedding::from_config(Some(&unsupported), None, 1.0, 8, 128).is_err());
    }
}
