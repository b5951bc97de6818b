//! Rotary position embeddings configured the way transformers configures them
//! (`rope_parameters`, or the older `rope_theta` + `rope_scaling`), the one RoPE of every
//! architecture: `default`, `linear` (positions divided by `factor`), `dynamic` (NTK:
//! the base grows once the sequence passes `max_position_embeddings`), `yarn` (with its
//! attention factor folded into the cos / sin tables) and `llama3` (Llama 3.1's smooth
//! interpolation); `longrope` is refused by name.
//!
//! YaRN's frequencies are computed in f32 like transformers' `_compute_yarn_parameters`;
//! the others in f64, as this runtime always computed plain RoPE (the shipped model was
//! trained so).

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
    /// Llama 3.1: wavelengths longer than `original_max_position_embeddings /
    /// low_freq_factor` are interpolated by `factor`.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// Llama 3.1: wavelengths shorter than `original_max_position_embeddings /
    /// high_freq_factor` are kept.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
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
    pub inv_freq: Vec<f64>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 for plain RoPE).
    pub attention_factor: f32,
    /// Dynamic NTK scaling: recomputes the frequencies for sequences past its length.
    pub dynamic: Option<DynamicNtk>,
}

/// transformers' `dynamic` rope type: for a sequence of `len > max_len` positions the
/// base becomes `base * (factor * len / max_len - (factor - 1))^(dim / (dim - 2))`.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicNtk {
    pub base: f64,
    pub factor: f64,
    pub max_len: usize,
}

/// `1 / base^(2i / dim)` for each pair, in f64.
fn default_inv_freq(base: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| base.powf(-(2.0 * i as f64) / dim as f64))
        .collect()
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
        let base = p.rope_theta.or(rope_theta).unwrap_or(default_theta);
        if dim == 0 || !dim.is_multiple_of(2) {
            return Err(format!("rotary dimension {dim} must be even and positive"));
        }
        let plain = |inv_freq: Vec<f64>| RotaryEmbedding {
            inv_freq,
            attention_factor: 1.0,
            dynamic: None,
        };
        let factor = |kind: &str| {
            p.factor
                .filter(|f| *f >= 1.0)
                .ok_or_else(|| format!("rope type '{kind}' needs a factor >= 1"))
        };
        match p.kind() {
            "default" => Ok(plain(default_inv_freq(base, dim))),
            "linear" => {
                let f = factor("linear")?;
                Ok(plain(
                    default_inv_freq(base, dim).iter().map(|x| x / f).collect(),
                ))
            }
            "dynamic" => Ok(RotaryEmbedding {
                dynamic: Some(DynamicNtk {
                    base,
                    factor: factor("dynamic")?,
                    max_len: max_position_embeddings,
                }),
                ..plain(default_inv_freq(base, dim))
            }),
            "llama3" => {
                let f = factor("llama3")?;
                let missing = |name: &str| format!("rope type 'llama3' needs {name}");
                let low = p
                    .low_freq_factor
                    .ok_or_else(|| missing("low_freq_factor"))?;
                let high = p
                    .high_freq_factor
                    .ok_or_else(|| missing("high_freq_factor"))?;
                let old = p
                    .original_max_position_embeddings
                    .ok_or_else(|| missing("original_max_position_embeddings"))?;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                let inv_freq = default_inv_freq(base, dim)
                    .into_iter()
                    .map(|x| {
                        let wavelen = 2.0 * std::f64::consts::PI / x;
                        if wavelen < high_wavelen {
                            x
                        } else if wavelen > low_wavelen {
                            x / f
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * x / f + smooth * x
                        }
                    })
                    .collect();
                Ok(plain(inv_freq))
            }
            "yarn" => Ok(Self::yarn(p, base as f32, dim, max_position_embeddings)),
            other => Err(format!(
                "rope type '{other}' is not supported (default, linear, dynamic, yarn, llama3)"
            )),
        }
    }

    /// YaRN, in f32 like transformers' `_compute_yarn_parameters`.
    fn yarn(p: &RopeParameters, base: f32, dim: usize, max_position_embeddings: usize) -> Self {
        let pos_freqs: Vec<f32> = (0..dim / 2)
            .map(|i| base.powf((2 * i) as f32 / dim as f32))
            .collect();
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
                (interp * (1.0 - extrapolation) + (1.0 / pf) * extrapolation) as f64
            })
            .collect();
        RotaryEmbedding {
            inv_freq,
            attention_factor: attention_factor as f32,
            dynamic: None,
        }
    }

    /// The frequencies for a sequence of `len` positions (dynamic NTK grows the base
    /// past its length; every other type is fixed).
    fn inv_freq_for(&self, len: usize) -> std::borrow::Cow<'_, [f64]> {
        match &self.dynamic {
            Some(d) if len > d.max_len => {
                let dim = self.dim() as f64;
                let base = d.base
                    * (d.factor * len as f64 / d.max_len as f64 - (d.factor - 1.0))
                        .powf(dim / (dim - 2.0));
                std::borrow::Cow::Owned(default_inv_freq(base, self.dim()))
            }
            _ => std::borrow::Cow::Borrowed(&self.inv_freq),
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
        let inv_freq = self.inv_freq_for(start + t);
        let mut cos = Vec::with_capacity(t * dim);
        let mut sin = Vec::with_capacity(t * dim);
        for p in start..start + t {
            let angles: Vec<f64> = inv_freq.iter().map(|&f| p as f64 * f).collect();
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

    fn close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-3), "{a:?} vs {b:?}");
        }
    }

    fn kind(kind: &str, factor: f64) -> RopeParameters {
        RopeParameters {
            rope_type: Some(kind.into()),
            factor: Some(factor),
            ..Default::default()
        }
    }

    fn values(r: &RotaryEmbedding, start: usize, t: usize) -> (Vec<f32>, Vec<f32>) {
        let dev = Device::flex();
        let (c, s) = r.tables(start, t, &dev);
        (
            c.into_data().try_to_vec::<f32>().unwrap(),
            s.into_data().try_to_vec::<f32>().unwrap(),
        )
    }

    #[test]
    fn linear_scaling_divides_positions_by_the_factor() {
        let plain = RotaryEmbedding::from_config(None, Some(10_000.0), 1.0, 16, 64).unwrap();
        let linear =
            RotaryEmbedding::from_config(Some(&kind("linear", 4.0)), Some(10_000.0), 1.0, 16, 64)
                .unwrap();
        // Position 4q with factor 4 is position q unscaled.
        let (c4, s4) = values(&linear, 0, 40);
        let (c1, s1) = values(&plain, 0, 10);
        for q in 0..10 {
            for d in 0..16 {
                assert!((c4[4 * q * 16 + d] - c1[q * 16 + d]).abs() < 1e-6);
                assert!((s4[4 * q * 16 + d] - s1[q * 16 + d]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn dynamic_ntk_changes_nothing_within_the_trained_length_and_grows_the_base_past_it() {
        let plain = RotaryEmbedding::from_config(None, Some(10_000.0), 1.0, 8, 32).unwrap();
        let dynamic =
            RotaryEmbedding::from_config(Some(&kind("dynamic", 2.0)), Some(10_000.0), 1.0, 8, 32)
                .unwrap();
        assert_eq!(values(&plain, 0, 32), values(&dynamic, 0, 32));
        // 48 positions: base 10000 * (2 * 48 / 32 - 1)^(8 / 6) = 10000 * 2^(4/3).
        let want = default_inv_freq(10_000.0 * 2f64.powf(4.0 / 3.0), 8);
        close(&dynamic.inv_freq_for(48), &want);
        assert_ne!(values(&plain, 40, 8), values(&dynamic, 40, 8));
    }

    #[test]
    fn llama3_keeps_high_frequencies_divides_low_ones_and_blends_between() {
        let p = RopeParameters {
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(64.0),
            ..kind("llama3", 8.0)
        };
        let r = RotaryEmbedding::from_config(Some(&p), Some(10_000.0), 1.0, 16, 1024).unwrap();
        let base = default_inv_freq(10_000.0, 16);
        for (got, f) in r.inv_freq.iter().zip(&base) {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < 64.0 / 4.0 {
                assert_eq!(got, f);
            } else if wavelen > 64.0 {
                assert!((got - f / 8.0).abs() < 1e-15);
            } else {
                let smooth = (64.0 / wavelen - 1.0) / 3.0;
                assert!((got - ((1.0 - smooth) * f / 8.0 + smooth * f)).abs() < 1e-15);
                assert!(*got < *f && *got > f / 8.0);
            }
        }
        let missing = RopeParameters {
            low_freq_factor: None,
            ..p
        };
        let e = RotaryEmbedding::from_config(Some(&missing), None, 1.0, 16, 64).unwrap_err();
        assert!(e.contains("low_freq_factor"), "{e}");
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
        let e = RotaryEmbedding::from_config(Some(&unsupported), None, 1.0, 8, 128).unwrap_err();
        assert!(e.contains("'longrope'"), "{e}");
    }
}
