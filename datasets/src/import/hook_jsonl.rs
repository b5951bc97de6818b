//! Hook JSONL (vLLM / Hugging Face forward hooks): one line per (token, layer),
//! `{"layer": L, "experts": [...], "gating_probs": [...], "token_idx": T, "seq" | "problem_id": ...}`.
//! Rows may come in any order (layer-major is common); they are grouped into tokens by
//! (sequence, token_idx). With `gating_probs` the ids are put in rank order (highest
//! probability first). Optional fields: `token` / `token_id`, `phase`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{resolve_n_experts, stem, ImportOptions, Imported};
use crate::error::{Result, TraceError};
use crate::trace::{Phase, TokenRecord, TraceBuilder, TraceMeta};

#[derive(Deserialize)]
struct Row {
    layer: u32,
    experts: Vec<u32>,
    #[serde(default)]
    gating_probs: Option<Vec<f32>>,
    token_idx: u32,
    #[serde(default)]
    seq: Option<Value>,
    #[serde(default)]
    problem_id: Option<Value>,
    #[serde(default, alias = "token_id")]
    token: Option<u32>,
    #[serde(default)]
    phase: Option<Phase>,
}

fn seq_name(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One (token, layer) row: its line, expert ids and gating probabilities.
struct LayerRow {
    line: usize,
    ids: Vec<u32>,
    probs: Option<Vec<f32>>,
}

struct TokenAcc {
    token: Option<u32>,
    phase: Option<Phase>,
    layers: BTreeMap<u32, LayerRow>,
}

pub(super) fn import(path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let text = std::fs::read_to_string(path).map_err(|e| TraceError::io(path, e))?;
    let default_seq = stem(path);
    let mut seq_order: Vec<String> = Vec::new();
    let mut seqs: HashMap<String, BTreeMap<u32, TokenAcc>> = HashMap::new();
    let mut all_layers = std::collections::BTreeSet::new();
    let mut k = None;
    let mut with_probs = None;
    let mut max_id = None;
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(line).map_err(|e| {
            TraceError::parse(
                path,
                lineno,
                format!("expected {{\"layer\", \"experts\", \"token_idx\", ...}}: {e}"),
            )
        })?;
        let err = |m: String| TraceError::parse(path, lineno, m);
        let want_k = *k.get_or_insert(row.experts.len());
        if row.experts.len() != want_k || want_k == 0 {
            return Err(err(format!(
                "{} experts, but the first row had k = {want_k} (wrong k)",
                row.experts.len()
            )));
        }
        if *with_probs.get_or_insert(row.gating_probs.is_some()) != row.gating_probs.is_some() {
            return Err(err(
                "\"gating_probs\" must be on every row or on none".into()
            ));
        }
        if let Some(p) = &row.gating_probs {
            if p.len() != row.experts.len() {
                return Err(err(format!(
                    "{} gating_probs for {} experts",
                    p.len(),
                    row.experts.len()
                )));
            }
        }
        max_id = max_id.max(row.experts.iter().copied().max());
        let name = row
            .seq
            .as_ref()
            .or(row.problem_id.as_ref())
            .map(seq_name)
            .unwrap_or_else(|| default_seq.clone());
        let tokens = seqs.entry(name.clone()).or_insert_with(|| {
            seq_order.push(name.clone());
            BTreeMap::new()
        });
        let acc = tokens.entry(row.token_idx).or_insert(TokenAcc {
            token: row.token,
            phase: row.phase,
            layers: BTreeMap::new(),
        });
        if acc.layers.contains_key(&row.layer) {
            return Err(err(format!(
                "second row for sequence '{name}', token_idx {}, layer {}",
                row.token_idx, row.layer
            )));
        }
        all_layers.insert(row.layer);
        acc.layers.insert(
            row.layer,
            LayerRow {
                line: lineno,
                ids: row.experts,
                probs: row.gating_probs,
            },
        );
    }
    if seq_order.is_empty() {
        return Err(TraceError::format(path, "empty file"));
    }
    let mut notes = Vec::new();
    let n_experts = resolve_n_experts(path, opts.n_experts, max_id, &mut notes)?;
    let moe_layers: Vec<u32> = all_layers.into_iter().collect();
    let ranked = with_probs == Some(true);
    if !ranked {
        notes.push(format!(
            "{}: no gating_probs; expert lists kept as given, marked unranked",
            path.display()
        ));
    }
    let meta = TraceMeta {
        channels: Vec::new(),
        model: stem(path),
        architecture: None,
        n_layers: moe_layers.last().map_or(0, |l| l + 1),
        moe_layers: moe_layers.clone(),
        n_experts,
        top_k: k.unwrap_or(0) as u32,
        n_shared_experts: 0,
        source: Some("hook_jsonl".into()),
        tokenizer: None,
        ranked,
        expert_bytes: None,
    };
    let mut builder =
        TraceBuilder::new(meta, ranked).map_err(|e| TraceError::format(path, e.to_string()))?;
    for name in &seq_order {
        for (&pos, acc) in &seqs[name] {
            let mut experts = Vec::with_capacity(moe_layers.len());
            let mut weights = Vec::with_capacity(moe_layers.len());
            let mut line = 0;
            for l in &moe_layers {
                match acc.layers.get(l) {
                    None => {
                        experts.push(None);
                        weights.push(None);
                    }
                    Some(row) => {
                        line = row.line;
                        let mut pairs: Vec<(u32, f32)> = row
                            .ids
                            .iter()
                            .zip(
                                row.probs
                                    .iter()
                                    .flatten()
                                    .chain(std::iter::repeat(&f32::NAN)),
                            )
                            .map(|(&e, &p)| (e, p))
                            .collect();
                        if ranked {
                            pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
                        }
                        experts.push(Some(pairs.iter().map(|p| p.0).collect()));
                        weights.push(ranked.then(|| pairs.iter().map(|p| p.1).collect()));
                    }
                }
            }
            let rec = TokenRecord {
                channels: Default::default(),
                seq: name.clone(),
                pos,
                phase: acc.phase.unwrap_or(Phase::Decode),
                token: acc.token,
                experts,
                weights: ranked.then_some(weights),
            };
            builder
                .push(&rec)
                .map_err(|e| TraceError::parse(path, line, e))?;
        }
    }
    let trace = builder.finish().map_err(|e| TraceError::format(path, e))?;
    Ok(Imported { trace, notes })
}
