//! route_trace v1 CSV (llama.cpp-based engines).
//!
//! A `#` comment header (`# model=... arch=... n_layer=48 n_expert=128 n_expert_used=6`,
//! then `# layer=L expert_bytes=B dense_bytes=D` per layer), then the CSV
//! `turn,phase,step,layer,slot,expert,weight,residency,expert_bytes`, one row per
//! routed expert. Phase 0 is prefill, 1 decode; step is the token's position; slot its
//! rank. A sequence is one (turn, phase) run. Layers without rows were not computed.

use std::collections::HashMap;
use std::path::Path;

use super::{stem, Imported};
use crate::error::{Result, TraceError};
use crate::trace::{Phase, TokenRecord, TraceBuilder, TraceMeta};

struct Header {
    model: Option<String>,
    arch: Option<String>,
    n_layer: Option<u32>,
    n_expert: Option<u32>,
    k: Option<u32>,
    expert_bytes: HashMap<u32, u64>,
}

fn parse_header(path: &Path, text: &str) -> Result<Header> {
    let mut h = Header {
        model: None,
        arch: None,
        n_layer: None,
        n_expert: None,
        k: None,
        expert_bytes: HashMap::new(),
    };
    for (i, line) in text.lines().enumerate() {
        let Some(body) = line.strip_prefix('#') else {
            continue;
        };
        let mut layer = None;
        let mut bytes = None;
        for kv in body.split_whitespace() {
            let Some((key, value)) = kv.split_once('=') else {
                continue;
            };
            let num = || {
                value.parse::<u64>().map_err(|_| {
                    TraceError::parse(path, i + 1, format!("{key}={value} is not a number"))
                })
            };
            match key {
                "model" => h.model = Some(value.to_string()),
                "arch" => h.arch = Some(value.to_string()),
                "n_layer" => h.n_layer = Some(num()? as u32),
                "n_expert" => h.n_expert = Some(num()? as u32),
                "n_expert_used" => h.k = Some(num()? as u32),
                "layer" => layer = Some(num()? as u32),
                "expert_bytes" => bytes = Some(num()?),
                _ => {}
            }
        }
        if let (Some(l), Some(b)) = (layer, bytes) {
            h.expert_bytes.insert(l, b);
        }
    }
    Ok(h)
}

/// One token being assembled from its rows.
struct TokenAcc {
    key: (u32, u8, u32),
    /// `n_layers x k` ids, `u32::MAX` where no row came yet.
    ids: Vec<u32>,
    weights: Vec<f32>,
    /// Line of the first row seen for each layer (0 = none).
    first_line: Vec<usize>,
}

pub(super) fn import(path: &Path) -> Result<Imported> {
    let text = std::fs::read_to_string(path).map_err(|e| TraceError::io(path, e))?;
    if text.trim().is_empty() {
        return Err(TraceError::format(path, "empty file"));
    }
    let h = parse_header(path, &text)?;
    let missing = |what: &str| {
        TraceError::format(
            path,
            format!("header lacks '# ... {what}=N' (route_trace v1 comment header)"),
        )
    };
    let n_layer = h.n_layer.ok_or_else(|| missing("n_layer"))?;
    let n_expert = h.n_expert.ok_or_else(|| missing("n_expert"))?;
    let k = h.k.ok_or_else(|| missing("n_expert_used"))?;
    let expert_bytes = (0..n_layer)
        .map(|l| h.expert_bytes.get(&l).copied())
        .collect::<Option<Vec<u64>>>();
    let meta = TraceMeta {
        channels: Vec::new(),
        model: h
            .model
            .as_deref()
            .map(|m| stem(Path::new(m)))
            .unwrap_or_else(|| stem(path)),
        architecture: h.arch.clone(),
        n_layers: n_layer,
        moe_layers: (0..n_layer).collect(),
        n_experts: n_expert,
        top_k: k,
        n_shared_experts: 0,
        source: Some("route_trace_v1".into()),
        tokenizer: None,
        ranked: true,
        expert_bytes,
    };
    meta.validate()
        .map_err(|e| TraceError::format(path, e.to_string()))?;

    let mut reader = csv::ReaderBuilder::new()
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| TraceError::format(path, format!("bad CSV header: {e}")))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h == name);
    let need = |name: &str| {
        col(name).ok_or_else(|| {
            TraceError::format(
                path,
                format!(
                    "CSV header lacks column '{name}' (found: {})",
                    headers.iter().collect::<Vec<_>>().join(",")
                ),
            )
        })
    };
    let (c_turn, c_phase, c_step, c_layer, c_slot, c_expert) = (
        need("turn")?,
        need("phase")?,
        need("step")?,
        need("layer")?,
        need("slot")?,
        need("expert")?,
    );
    let c_weight = col("weight");

    let (nl, kk) = (n_layer as usize, k as usize);
    let mut tokens: Vec<TokenAcc> = Vec::new();
    let mut index: HashMap<(u32, u8, u32), usize> = HashMap::new();
    let mut record = csv::StringRecord::new();
    loop {
        let more = reader.read_record(&mut record).map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            TraceError::parse(path, line, format!("bad CSV row: {e}"))
        })?;
        if !more {
            break;
        }
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        let err = |m: String| TraceError::parse(path, line, m);
        let field = |c: usize, name: &str| -> Result<u64> {
            let s = record.get(c).unwrap_or("");
            s.parse::<u64>()
                .map_err(|_| err(format!("{name} '{s}' is not a non-negative integer")))
        };
        let turn = field(c_turn, "turn")? as u32;
        let phase = field(c_phase, "phase")?;
        if phase > 1 {
            return Err(err(format!(
                "phase {phase} (expected 0 = prefill or 1 = decode)"
            )));
        }
        let step = field(c_step, "step")? as u32;
        let layer = field(c_layer, "layer")? as usize;
        let slot = field(c_slot, "slot")? as usize;
        let expert = field(c_expert, "expert")?;
        let weight = match c_weight {
            Some(c) => {
                let s = record.get(c).unwrap_or("");
                s.parse::<f32>()
                    .ok()
                    .filter(|w| w.is_finite())
                    .ok_or_else(|| err(format!("weight '{s}' is not a finite number")))?
            }
            None => f32::NAN,
        };
        if layer >= nl {
            return Err(err(format!(
                "layer {layer} is not below n_layer = {n_layer}"
            )));
        }
        if slot >= kk {
            return Err(err(format!(
                "slot {slot} is not below n_expert_used = {k} (wrong k)"
            )));
        }
        if expert >= n_expert as u64 {
            return Err(err(format!(
                "expert id {expert} is not below n_expert = {n_expert}"
            )));
        }
        let key = (turn, phase as u8, step);
        let ti = *index.entry(key).or_insert_with(|| {
            tokens.push(TokenAcc {
                key,
                ids: vec![u32::MAX; nl * kk],
                weights: vec![f32::NAN; nl * kk],
                first_line: vec![0; nl],
            });
            tokens.len() - 1
        });
        let acc = &mut tokens[ti];
        let row = &mut acc.ids[layer * kk..(layer + 1) * kk];
        if row[slot] != u32::MAX {
            return Err(err(format!(
                "duplicate row for turn {turn}, phase {phase}, step {step}, layer {layer}, slot {slot}"
            )));
        }
        if row.contains(&(expert as u32)) {
            return Err(err(format!(
                "expert id {expert} appears twice in the top-k of step {step}, layer {layer}"
            )));
        }
        row[slot] = expert as u32;
        acc.weights[layer * kk + slot] = weight;
        if acc.first_line[layer] == 0 {
            acc.first_line[layer] = line;
        }
    }
    if tokens.is_empty() {
        return Err(TraceError::format(path, "no routing rows after the header"));
    }
    tokens.sort_by_key(|t| t.key);

    let mut builder = TraceBuilder::new(meta, c_weight.is_some())?;
    for acc in &tokens {
        let (turn, phase, step) = acc.key;
        let phase = if phase == 0 {
            Phase::Prefill
        } else {
            Phase::Decode
        };
        let mut experts = Vec::with_capacity(nl);
        let mut weights = Vec::with_capacity(nl);
        for l in 0..nl {
            let ids = &acc.ids[l * kk..(l + 1) * kk];
            let filled = ids.iter().filter(|&&e| e != u32::MAX).count();
            if filled == 0 {
                experts.push(None);
                weights.push(None);
            } else if filled < kk {
                return Err(TraceError::parse(
                    path,
                    acc.first_line[l],
                    format!(
                        "step {step}, layer {l}: {filled} of n_expert_used = {k} slots present (wrong k or truncated file)"
                    ),
                ));
            } else {
                experts.push(Some(ids.to_vec()));
                weights.push(Some(acc.weights[l * kk..(l + 1) * kk].to_vec()));
            }
        }
        let rec = TokenRecord {
            channels: Default::default(),
            seq: format!("turn{turn}-{}", phase.as_str()),
            pos: step,
            phase,
            token: None,
            experts,
            weights: c_weight.is_some().then_some(weights),
        };
        let line = acc.first_line.iter().copied().find(|&l| l > 0).unwrap_or(0);
        builder
            .push(&rec)
            .map_err(|e| TraceError::parse(path, line, e))?;
    }
    let trace = builder.finish().map_err(|e| TraceError::format(path, e))?;
    Ok(Imported {
        trace,
        notes: Vec::new(),
    })
}
