//! RouterTrace v2 JSON (transformers capture): `{"tokens", "layers", "expertsPerLayer",
//! "topK", "selections": [token][layer][rank]}`. A `capture-metadata.json` beside the
//! file supplies `prompt_spans` (the sequences) and `sparse_encoder_block_indices` (the
//! model layers the MoE layers are); without it all tokens are one sequence.

use std::path::Path;

use serde::Deserialize;

use super::{stem, Imported};
use crate::error::{Result, TraceError};
use crate::trace::{Phase, TokenRecord, TraceBuilder, TraceMeta};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RouterTrace {
    tokens: usize,
    layers: usize,
    experts_per_layer: u32,
    top_k: u32,
    selections: Vec<Vec<Vec<u32>>>,
    #[serde(default)]
    source: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Span {
    id: String,
    token_start: usize,
    token_end_exclusive: usize,
}

#[derive(Deserialize)]
struct CaptureMetadata {
    #[serde(default)]
    prompt_spans: Vec<Span>,
    #[serde(default)]
    sparse_encoder_block_indices: Option<Vec<u32>>,
}

/// Name of the sidecar file read when present.
pub const SIDECAR: &str = "capture-metadata.json";

fn json_err(path: &Path, e: serde_json::Error) -> TraceError {
    TraceError::parse(path, e.line(), format!("{e}"))
}

pub(super) fn import(path: &Path) -> Result<Imported> {
    let text = std::fs::read_to_string(path).map_err(|e| TraceError::io(path, e))?;
    if text.trim().is_empty() {
        return Err(TraceError::format(path, "empty file"));
    }
    let rt: RouterTrace = serde_json::from_str(&text).map_err(|e| json_err(path, e))?;
    if rt.selections.len() != rt.tokens {
        return Err(TraceError::format(
            path,
            format!(
                "\"tokens\" says {} but \"selections\" has {} entries",
                rt.tokens,
                rt.selections.len()
            ),
        ));
    }
    let mut notes = Vec::new();
    let sidecar_path = path.with_file_name(SIDECAR);
    let sidecar: Option<CaptureMetadata> = if sidecar_path.exists() {
        let s =
            std::fs::read_to_string(&sidecar_path).map_err(|e| TraceError::io(&sidecar_path, e))?;
        let m: CaptureMetadata =
            serde_json::from_str(&s).map_err(|e| json_err(&sidecar_path, e))?;
        notes.push(format!(
            "{}: using sidecar {} ({} prompt spans as sequences)",
            path.display(),
            sidecar_path.display(),
            m.prompt_spans.len()
        ));
        Some(m)
    } else {
        notes.push(format!(
            "{}: no {SIDECAR} beside it; all {} tokens are one sequence",
            path.display(),
            rt.tokens
        ));
        None
    };
    let block_layers = sidecar
        .as_ref()
        .and_then(|s| s.sparse_encoder_block_indices.clone())
        .filter(|l| l.len() == rt.layers);
    let (n_layers, moe_layers) = match block_layers {
        Some(l) => (l.iter().max().map_or(0, |m| m + 1), l),
        None => (rt.layers as u32, (0..rt.layers as u32).collect()),
    };
    let model = rt
        .source
        .as_ref()
        .and_then(|s| s.pointer("/model/id"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| stem(path));
    let meta = TraceMeta {
        channels: Vec::new(),
        model,
        architecture: None,
        n_layers,
        moe_layers,
        n_experts: rt.experts_per_layer,
        top_k: rt.top_k,
        n_shared_experts: 0,
        source: Some("router_trace_v2".into()),
        tokenizer: None,
        ranked: true,
        expert_bytes: None,
    };
    let mut builder =
        TraceBuilder::new(meta, false).map_err(|e| TraceError::format(path, e.to_string()))?;
    let spans: Vec<(String, usize, usize)> = match &sidecar {
        Some(s) if !s.prompt_spans.is_empty() => s
            .prompt_spans
            .iter()
            .map(|p| (p.id.clone(), p.token_start, p.token_end_exclusive))
            .collect(),
        _ => vec![(stem(path), 0, rt.tokens)],
    };
    let mut next = 0;
    for (id, start, end) in &spans {
        if *start != next || end < start || *end > rt.tokens {
            return Err(TraceError::format(
                &sidecar_path,
                format!("prompt span '{id}' [{start}, {end}) does not continue at token {next} within {} tokens", rt.tokens),
            ));
        }
        next = *end;
        for t in *start..*end {
            let layers = &rt.selections[t];
            if layers.len() != rt.layers {
                return Err(TraceError::format(
                    path,
                    format!(
                        "selections[{t}] has {} layers, expected {}",
                        layers.len(),
                        rt.layers
                    ),
                ));
            }
            let rec = TokenRecord {
                channels: Default::default(),
                seq: id.clone(),
                pos: (t - start) as u32,
                phase: Phase::Prefill,
                token: None,
                experts: layers.iter().cloned().map(Some).collect(),
                weights: None,
            };
            builder
                .push(&rec)
                .map_err(|e| TraceError::format(path, format!("selections[{t}]: {e}")))?;
        }
    }
    if next != rt.tokens {
        return Err(TraceError::format(
            &sidecar_path,
            format!("prompt spans cover {next} of {} tokens", rt.tokens),
        ));
    }
    let trace = builder.finish().map_err(|e| TraceError::format(path, e))?;
    Ok(Imported { trace, notes })
}
