//! Synthetic checkpoints at production shapes: a Qwen3-MoE checkpoint in the published
//! layout (`config.json`, `model.safetensors` in bf16) with seeded random weights, so
//! the offloading engine can be measured with real expert sizes and real disk reads
//! where no trained weights can be downloaded. The weights are streamed to disk, never
//! held in memory: a 4 GB checkpoint needs a few MB.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::json;

use crate::error::{Result, TinyMoeError};
use crate::{export::hf_config, TinyMoeConfig};

/// A named preset of a published model's shape (its layers may be cut).
pub fn preset(name: &str) -> Option<TinyMoeConfig> {
    match name {
        // Qwen3-30B-A3B: 48 layers of 128 experts (top-8) of 2048 x 768.
        "qwen3-30b-a3b" => Some(TinyMoeConfig {
            vocab_size: 151936,
            hidden_size: 2048,
            num_layers: 48,
            num_heads: 32,
            num_kv_heads: 4,
            head_dim: 128,
            num_experts: 128,
            top_k: 8,
            moe_intermediate_size: 768,
            context: 4096,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            tie_embeddings: false,
        }),
        _ => None,
    }
}

/// Bytes of one routed expert (gate, up and down projections, bf16).
pub fn expert_bytes(c: &TinyMoeConfig) -> u64 {
    3 * c.hidden_size as u64 * c.moe_intermediate_size as u64 * 2
}

/// The tensors of a Qwen3-MoE checkpoint of shape `c`, in file order: name, shape and
/// whether it is a norm weight (ones) rather than a random matrix.
fn tensors(c: &TinyMoeConfig) -> Vec<(String, Vec<usize>, bool)> {
    let (h, q, kv) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
    );
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, h],
        false,
    )];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let a = format!("{p}.self_attn");
        out.push((format!("{p}.input_layernorm.weight"), vec![h], true));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            true,
        ));
        out.push((format!("{a}.q_proj.weight"), vec![q, h], false));
        out.push((format!("{a}.k_proj.weight"), vec![kv, h], false));
        out.push((format!("{a}.v_proj.weight"), vec![kv, h], false));
        out.push((format!("{a}.o_proj.weight"), vec![h, q], false));
        out.push((format!("{a}.q_norm.weight"), vec![c.head_dim], true));
        out.push((format!("{a}.k_norm.weight"), vec![c.head_dim], true));
        out.push((
            format!("{p}.mlp.gate.weight"),
            vec![c.num_experts, h],
            false,
        ));
        for e in 0..c.num_experts {
            let m = format!("{p}.mlp.experts.{e}");
            let i = c.moe_intermediate_size;
            out.push((format!("{m}.gate_proj.weight"), vec![i, h], false));
            out.push((format!("{m}.up_proj.weight"), vec![i, h], false));
            out.push((format!("{m}.down_proj.weight"), vec![h, i], false));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h], true));
    if !c.tie_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h], false));
    }
    out
}

/// SplitMix64: a seeded stream of random words.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Writes a Qwen3-MoE checkpoint of shape `c` with weights uniform in
/// `±0.02·√3` (standard deviation 0.02; norms 1) from `seed` into `out`
/// (`config.json`, `model.safetensors`); files are written beside and renamed into
/// place. Returns the bytes written.
pub fn write_synthetic_checkpoint(out: &Path, c: &TinyMoeConfig, seed: u64) -> Result<u64> {
    if !c.num_heads.is_multiple_of(c.num_kv_heads.max(1))
        || !c.head_dim.is_multiple_of(2)
        || c.top_k > c.num_experts
    {
        return Err(TinyMoeError::input(format!(
            "synthetic checkpoint: {} heads must be a multiple of {} key/value heads, head_dim {} even, top-k {} at most {} experts",
            c.num_heads, c.num_kv_heads, c.head_dim, c.top_k, c.num_experts
        )));
    }
    fs::create_dir_all(out).map_err(|e| TinyMoeError::io(out, e))?;
    let list = tensors(c);
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        json!({"format": "pt", "moecast": format!("synthetic, seed {seed}")}),
    );
    let mut offset = 0u64;
    for (name, shape, _) in &list {
        let n = shape.iter().product::<usize>() as u64 * 2;
        header.insert(
            name.clone(),
            json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut head = serde_json::to_vec(&header).expect("header serialises");
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let tmp = out.join("model.safetensors.partial");
    let file = fs::File::create(&tmp).map_err(|e| TinyMoeError::io(&tmp, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| TinyMoeError::io(&tmp, e);
    w.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&head).map_err(io)?;
    let mut rng = Random(seed);
    let scale = 0.02 * 3f32.sqrt();
    let one = half::bf16::from_f32(1.0).to_le_bytes();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    for (_, shape, ones) in &list {
        let n: usize = shape.iter().product();
        let mut left = n;
        while left > 0 {
            let chunk = left.min(1 << 19);
            buf.clear();
            for _ in 0..chunk {
                let bytes = if *ones {
                    one
                } else {
                    // 24 random bits to a uniform in [-1, 1).
                    let u = (rng.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                    half::bf16::from_f32(u * scale).to_le_bytes()
                };
                buf.extend_from_slice(&bytes);
            }
            w.write_all(&buf).map_err(io)?;
            left -= chunk;
        }
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let config = serde_json::to_string_pretty(&hf_config(c, 0, 0.0)).expect("config serialises");
    let cfg_tmp = out.join("config.json.partial");
    fs::write(&cfg_tmp, config).map_err(|e| TinyMoeError::io(&cfg_tmp, e))?;
    let dst = out.join("model.safetensors");
    fs::rename(&tmp, &dst).map_err(|e| TinyMoeError::io(&dst, e))?;
    let dst = out.join("config.json");
    fs::rename(&cfg_tmp, &dst).map_err(|e| TinyMoeError::io(&dst, e))?;
    Ok(8 + head.len() as u64 + offset)
}
