//! Per-request routing returned by serving engines, one sequence per request (choice):
//!
//! - **vLLM** (`enable_return_routed_experts`): a completion response whose
//!   `choices[i].routed_experts` is base64 of an `np.save` `.npy` file `[tokens, layers,
//!   top_k]` (uint8 / uint16 / int32: the dtype is read from the data) over prompt +
//!   generated - 1 tokens (the last sampled token is never forwarded), optionally with
//!   `prompt_token_ids` / `token_ids`; the older layout splits it into a top-level
//!   `prompt_routed_experts` and `choices[0].routed_experts`, as JSON nested lists; a bare
//!   `.npy` file or a JSON nested list holds one array;
//! - **SGLang** (`--enable-return-routed-experts`): `meta_info.routed_experts`, base64 of
//!   raw row-major integers (`meta_info.routed_experts_dtype`, default int32) of shape
//!   `[tokens, layers * top_k]`; the layer count comes from the data (rows = prompt +
//!   completion - 1 tokens) and `--top-k`.
//!
//! The layer axis covers every hidden layer (dense layers are never written and read as
//! all zeros: such layers are dropped and the rest are the MoE layers) or only the MoE
//! layers (numbered 0.. unless `--moe-layers` gives their model layer numbers; with the
//! every-layer layout `--moe-layers` picks the MoE layers instead of the zero test).
//! The model name is the response's `model` field, else the file stem. `-1` marks a
//! position whose routing was not computed (prefix cache): the token is kept with that
//! layer not computed.

use std::path::Path;

use base64::Engine;
use serde_json::Value;

use super::{resolve_n_experts, stem, ImportOptions, Imported};
use crate::error::{Result, TraceError};
use crate::trace::{Phase, TokenRecord, TraceBuilder, TraceMeta};

/// One request's routing: `[tokens, layers, k]`, `-1` = not computed.
struct Grid {
    name: String,
    tokens: usize,
    layers: usize,
    k: usize,
    ids: Vec<i64>,
    token_ids: Option<Vec<u32>>,
    prompt_len: Option<usize>,
}

impl Grid {
    /// The ids of token `t` at layer `l`.
    fn row(&self, t: usize, l: usize) -> &[i64] {
        &self.ids[(t * self.layers + l) * self.k..][..self.k]
    }
}

/// The first bytes of every `.npy` file.
const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Whether `head` (a file's first bytes) looks like a serving-engine routing file.
pub(super) fn sniff(head: &[u8], text: &str) -> bool {
    head.starts_with(NPY_MAGIC)
        || text.contains("\"routed_experts\"")
        || text.contains("\"prompt_routed_experts\"")
}

/// The array's values, of element type `T`, widened to i64.
fn widen<T: npyz::Deserialize + Into<i64>>(
    npy: npyz::NpyFile<&[u8]>,
    what: &str,
) -> std::result::Result<Vec<i64>, String> {
    let values = npy.into_vec::<T>().map_err(|e| format!("{what}: {e}"))?;
    Ok(values.into_iter().map(Into::into).collect())
}

fn npy_grid(bytes: &[u8], what: &str) -> std::result::Result<(Vec<usize>, Vec<i64>), String> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| format!("{what}: not a .npy array: {e}"))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let dtype = npy.dtype();
    let descr = dtype.descr();
    let ids: Vec<i64> = match descr.trim_matches('\'') {
        "|u1" => widen::<u8>(npy, what)?,
        "<u2" => widen::<u16>(npy, what)?,
        "<i2" => widen::<i16>(npy, what)?,
        "<i4" => widen::<i32>(npy, what)?,
        "<i8" => widen::<i64>(npy, what)?,
        other => {
            return Err(format!(
                "{what}: dtype {other} is not an integer type moecast reads (u1, u2, i2, i4, i8)"
            ))
        }
    };
    Ok((shape, ids))
}

/// A `[tokens][layers][k]` nested list, or a base64 `.npy` string.
fn array(v: &Value, what: &str) -> std::result::Result<(Vec<usize>, Vec<i64>), String> {
    match v {
        Value::String(s) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map_err(|e| format!("{what}: bad base64: {e}"))?;
            npy_grid(&bytes, what)
        }
        Value::Array(rows) => {
            let mut ids = Vec::new();
            let (mut layers, mut k) = (None, None);
            for (t, row) in rows.iter().enumerate() {
                let row = row
                    .as_array()
                    .ok_or_else(|| format!("{what}: token {t} is not a list of layers"))?;
                if *layers.get_or_insert(row.len()) != row.len() {
                    return Err(format!(
                        "{what}: token {t} has {} layers, token 0 has {}",
                        row.len(),
                        layers.unwrap_or(0)
                    ));
                }
                for (l, ks) in row.iter().enumerate() {
                    let ks = ks.as_array().ok_or_else(|| {
                        format!("{what}: token {t}, layer {l} is not a list of ids")
                    })?;
                    if *k.get_or_insert(ks.len()) != ks.len() {
                        return Err(format!(
                            "{what}: token {t}, layer {l} has {} ids, expected {}",
                            ks.len(),
                            k.unwrap_or(0)
                        ));
                    }
                    for x in ks {
                        ids.push(x.as_i64().ok_or_else(|| {
                            format!("{what}: token {t}, layer {l}: {x} is not an integer")
                        })?);
                    }
                }
            }
            Ok((vec![rows.len(), layers.unwrap_or(0), k.unwrap_or(0)], ids))
        }
        other => Err(format!(
            "{what}: expected a base64 .npy string or a nested list, found {}",
            kind(other)
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn grid(name: String, shape: Vec<usize>, ids: Vec<i64>) -> std::result::Result<Grid, String> {
    if shape.len() != 3 {
        return Err(format!(
            "{name}: expected a [tokens, layers, top_k] array, found shape {shape:?}"
        ));
    }
    Ok(Grid {
        name,
        tokens: shape[0],
        layers: shape[1],
        k: shape[2],
        ids,
        token_ids: None,
        prompt_len: None,
    })
}

fn u32_list(v: Option<&Value>) -> Option<Vec<u32>> {
    v?.as_array()?
        .iter()
        .map(|x| x.as_u64().map(|x| x as u32))
        .collect()
}

/// The requests of a file, the model its response names (if any) and the engine.
fn grids(
    path: &Path,
    opts: &ImportOptions,
) -> std::result::Result<(Vec<Grid>, Option<String>, &'static str), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let name = stem(path);
    if bytes.starts_with(NPY_MAGIC) {
        let (shape, ids) = npy_grid(&bytes, "array")?;
        return Ok((vec![grid(name, shape, ids)?], None, "vllm"));
    }
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
    if v.is_array() {
        let (shape, ids) = array(&v, "array")?;
        return Ok((vec![grid(name, shape, ids)?], None, "vllm"));
    }
    let model = v.get("model").and_then(Value::as_str).map(str::to_string);
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        let mut out = Vec::new();
        let prompt_ids = u32_list(v.get("prompt_token_ids"));
        for (i, c) in choices.iter().enumerate() {
            let what = format!("choices[{i}].routed_experts");
            let Some(gen) = c.get("routed_experts").filter(|x| !x.is_null()) else {
                continue;
            };
            let (mut shape, mut ids) = array(gen, &what)?;
            let mut prompt_len = None;
            let split = c
                .get("prompt_routed_experts")
                .or(v.get("prompt_routed_experts"));
            if let Some(p) = split.filter(|x| !x.is_null()) {
                let (ps, pids) = array(p, "prompt_routed_experts")?;
                if ps.len() != 3 || shape.len() != 3 || ps[1..] != shape[1..] {
                    return Err(format!("prompt_routed_experts has shape {ps:?}, {what} {shape:?}: layers and top_k differ"));
                }
                prompt_len = Some(ps[0]);
                shape[0] += ps[0];
                ids = pids.into_iter().chain(ids).collect();
            }
            let suffix = if choices.len() > 1 {
                format!("#c{i}")
            } else {
                String::new()
            };
            let mut g = grid(format!("{name}{suffix}"), shape, ids)?;
            let p = u32_list(c.get("prompt_token_ids")).or(prompt_ids.clone());
            let gen_ids = u32_list(c.get("token_ids"));
            g.prompt_len = prompt_len.or(p.as_ref().map(Vec::len));
            if let (Some(p), Some(gt)) = (p, gen_ids) {
                let all: Vec<u32> = p.into_iter().chain(gt).collect();
                g.token_ids = (all.len() >= g.tokens).then(|| all[..g.tokens].to_vec());
            }
            out.push(g);
        }
        if out.is_empty() {
            return Err("no choice has routed_experts (was the server started with --enable-return-routed-experts?)".into());
        }
        return Ok((out, model, "vllm"));
    }
    if let Some(meta) = v
        .get("meta_info")
        .filter(|m| m.get("routed_experts").is_some())
    {
        let s = meta["routed_experts"]
            .as_str()
            .ok_or("meta_info.routed_experts is not a base64 string")?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| format!("meta_info.routed_experts: bad base64: {e}"))?;
        let dtype = meta
            .get("routed_experts_dtype")
            .and_then(Value::as_str)
            .unwrap_or("int32");
        let ids: Vec<i64> = match dtype {
            "int32" => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            "uint16" => raw
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            "uint8" => raw.iter().map(|&b| b as i64).collect(),
            other => {
                return Err(format!(
                    "meta_info.routed_experts_dtype {other} (int32, uint16, uint8)"
                ))
            }
        };
        let count = |f: &str| meta.get(f).and_then(Value::as_u64).map(|x| x as usize);
        let rows =
            match (count("prompt_tokens"), count("completion_tokens")) {
                (Some(p), Some(c)) if p + c > 1 => p + c - 1,
                _ => return Err(
                    "meta_info lacks prompt_tokens / completion_tokens: the row count is unknown"
                        .into(),
                ),
            };
        let k = opts
            .top_k
            .ok_or("SGLang's routed_experts does not record top_k: pass --top-k")?
            as usize;
        if rows == 0 || k == 0 || !ids.len().is_multiple_of(rows * k) {
            return Err(format!("meta_info.routed_experts holds {} ids, not a multiple of {rows} tokens x top_k {k}", ids.len()));
        }
        let layers = ids.len() / (rows * k);
        let mut g = grid(name, vec![rows, layers, k], ids)?;
        g.prompt_len = count("prompt_tokens");
        return Ok((vec![g], model, "sglang"));
    }
    Err("no routed_experts (vLLM choices[i].routed_experts, SGLang meta_info.routed_experts) and not a [tokens][layers][k] array".into())
}

/// Imports one response / array file.
pub(super) fn import(path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let fail = |m: String| TraceError::format(path, m);
    let (grids, model, engine) = grids(path, opts).map_err(fail)?;
    let (layers, k) = (grids[0].layers, grids[0].k);
    if let Some(g) = grids.iter().find(|g| (g.layers, g.k) != (layers, k)) {
        return Err(fail(format!(
            "{}: {} layers x top-{}, the first request {layers} x top-{k}",
            g.name, g.layers, g.k
        )));
    }
    let mut notes = Vec::new();
    // Model layer number of each MoE layer, and its index on the array's layer axis.
    let (moe_layers, axis): (Vec<u32>, Vec<usize>) = match &opts.moe_layers {
        Some(list) if list.len() == layers => (list.clone(), (0..layers).collect()),
        Some(list) if list.iter().all(|&l| (l as usize) < layers) => {
            (list.clone(), list.iter().map(|&l| l as usize).collect())
        }
        Some(list) => {
            return Err(fail(format!(
                "--moe-layers names {} layers (up to {}), the array's layer axis has {layers}: give one number per entry of the axis (MoE-only layout) or layers below {layers} (every-layer layout)",
                list.len(),
                list.iter().max().copied().unwrap_or(0)
            )))
        }
        None => {
            // A layer that is all zeros in every computed row (k > 1 ids cannot all be
            // 0) is a dense layer the engine never wrote.
            let dense: Vec<bool> = (0..layers)
                .map(|l| {
                    k > 1
                        && grids.iter().all(|g| {
                            (0..g.tokens).all(|t| g.row(t, l).iter().all(|&x| x == 0 || x == -1))
                        })
                })
                .collect();
            let moe: Vec<u32> = (0..layers as u32).filter(|&l| !dense[l as usize]).collect();
            if moe.len() < layers {
                notes.push(format!(
                    "{}: layers {:?} are all zeros (dense layers the engine leaves unwritten): MoE layers {:?}",
                    path.display(),
                    (0..layers).filter(|&l| dense[l]).collect::<Vec<_>>(),
                    moe
                ));
            }
            let axis = moe.iter().map(|&l| l as usize).collect();
            (moe, axis)
        }
    };
    let n_layers = (layers as u32).max(moe_layers.iter().max().map_or(0, |m| m + 1));
    let max_id = grids
        .iter()
        .flat_map(|g| g.ids.iter())
        .copied()
        .max()
        .filter(|&m| m >= 0);
    let n_experts = resolve_n_experts(path, opts.n_experts, max_id.map(|m| m as u32), &mut notes)?;
    let meta = TraceMeta {
        model: model.unwrap_or_else(|| stem(path)),
        architecture: None,
        n_layers,
        moe_layers: moe_layers.clone(),
        n_experts,
        top_k: k as u32,
        n_shared_experts: 0,
        source: Some(engine.into()),
        tokenizer: None,
        ranked: true,
        expert_bytes: None,
        channels: Vec::new(),
    };
    let mut b = TraceBuilder::new(meta, false).map_err(|e| fail(e.to_string()))?;
    for g in &grids {
        for t in 0..g.tokens {
            let mut experts = Vec::with_capacity(moe_layers.len());
            for (&l, &a) in moe_layers.iter().zip(&axis) {
                let ids = g.row(t, a);
                if ids.iter().all(|&x| x == -1) {
                    experts.push(None);
                } else if let Some(&x) = ids.iter().find(|&&x| x < 0) {
                    return Err(fail(format!(
                        "{}: token {t}, layer {l}: id {x} beside computed ids",
                        g.name
                    )));
                } else {
                    experts.push(Some(ids.iter().map(|&x| x as u32).collect()));
                }
            }
            let rec = TokenRecord {
                seq: g.name.clone(),
                pos: t as u32,
                phase: match g.prompt_len {
                    Some(p) if t >= p => Phase::Decode,
                    Some(_) => Phase::Prefill,
                    None => Phase::Decode,
                },
                token: g.token_ids.as_ref().map(|v| v[t]),
                experts,
                weights: None,
                channels: Default::default(),
            };
            b.push(&rec)
                .map_err(|e| fail(format!("{}: token {t}: {e}", g.name)))?;
        }
    }
    let trace = b.finish().map_err(fail)?;
    Ok(Imported { trace, notes })
}
