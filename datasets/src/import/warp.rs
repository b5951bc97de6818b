//! warp JSONL: one line per decode step, `{"tok": N, "layers": [[k ids] per MoE layer]}`,
//! ids sorted ascending (rank and weights not recorded). One file is one sequence.

use std::path::Path;

use serde::Deserialize;

use super::{resolve_n_experts, stem, ImportOptions, Imported};
use crate::error::{Result, TraceError};
use crate::trace::{Phase, TokenRecord, TraceBuilder, TraceMeta};

#[derive(Deserialize)]
struct Line {
    tok: u32,
    layers: Vec<Vec<u32>>,
}

pub(super) fn import(path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let text = std::fs::read_to_string(path).map_err(|e| TraceError::io(path, e))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Line = serde_json::from_str(line).map_err(|e| {
            TraceError::parse(
                path,
                i + 1,
                format!("expected {{\"tok\": N, \"layers\": [[ids]...]}}: {e}"),
            )
        })?;
        rows.push((i + 1, row));
    }
    let Some((_, first)) = rows.first() else {
        return Err(TraceError::format(path, "empty file"));
    };
    let n_moe = first.layers.len();
    let k = first.layers.first().map_or(0, Vec::len);
    if n_moe == 0 || k == 0 {
        return Err(TraceError::parse(
            path,
            rows[0].0,
            "no layers or empty top-k",
        ));
    }
    let max_id = rows
        .iter()
        .flat_map(|(_, r)| r.layers.iter().flatten())
        .copied()
        .max();
    let mut notes = Vec::new();
    let n_experts = resolve_n_experts(path, opts.n_experts, max_id, &mut notes)?;
    notes.push(format!(
        "{}: warp JSONL has no layer map; recording {n_moe} MoE layers as layers 0..{n_moe}",
        path.display()
    ));
    let meta = TraceMeta {
        channels: Vec::new(),
        model: stem(path),
        architecture: None,
        n_layers: n_moe as u32,
        moe_layers: (0..n_moe as u32).collect(),
        n_experts,
        top_k: k as u32,
        n_shared_experts: 0,
        source: Some("warp_jsonl".into()),
        tokenizer: None,
        ranked: false,
        expert_bytes: None,
    };
    let mut builder =
        TraceBuilder::new(meta, false).map_err(|e| TraceError::format(path, e.to_string()))?;
    let seq = stem(path);
    for (line, row) in rows {
        let rec = TokenRecord {
            channels: Default::default(),
            seq: seq.clone(),
            pos: row.tok,
            phase: Phase::Decode,
            token: None,
            experts: row.layers.into_iter().map(Some).collect(),
            weights: None,
        };
        builder
            .push(&rec)
            .map_err(|e| TraceError::parse(path, line, e))?;
    }
    let trace = builder.finish().map_err(|e| TraceError::format(path, e))?;
    Ok(Imported { trace, notes })
}
