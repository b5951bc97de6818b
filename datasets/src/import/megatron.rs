//! Megatron-LM routing traces (`--moe-routing-trace-path DIR`,
//! `megatron/core/transformer/moe/router_trace.py`): per rank `router_trace_rank{N}.jsonl`,
//! one line per (step, block, layer) with `top_indices` `[num_tokens][topk]` (ids sorted
//! ascending on the hook path), and optionally `hidden_states_rank{N}.bin`, the router
//! inputs as bf16 `[num_tokens, hidden]` at the line's `hs_offset` (`hs_bytes`,
//! `hs_shape`), imported as the trace's router inputs, and `logits_rank{N}.bin`, the
//! router logits as bf16 `[num_tokens, num_experts]` at `logit_offset` (`logit_bytes`,
//! `logit_shape`), imported as the trace's router logits.
//!
//! Ranks are merged: a rank whose records repeat another rank's exactly (tensor-parallel
//! twins see the same tokens) is dropped; the others hold different tokens (sequence or
//! data parallel shards) and become their own sequences. Every microbatch of a step
//! writes its own line per layer: the i-th line of a (step, layer) is microbatch i. One
//! sequence per (rank, step, microbatch), named `rank{R}/step{S}/mb{i}`. MTP records
//! (`block: "mtp"`) are skipped. Layer numbers are taken as 0-based (the hook path's
//! `decoder.layers.{i}`); `--layer-base 1` reads the inference path's 1-based
//! `layer_number`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{resolve_n_experts, ImportOptions, Imported};
use crate::channel::{Channel, ROUTER_INPUTS, ROUTER_LOGITS};
use crate::error::{Result, TraceError};
use crate::trace::{Phase, TokenRecord, TraceBuilder, TraceMeta};

#[derive(Deserialize, PartialEq)]
struct Line {
    step: u64,
    #[serde(default)]
    block: Option<String>,
    layer: u32,
    num_tokens: usize,
    topk: usize,
    top_indices: Vec<Vec<u32>>,
    #[serde(default)]
    hs_offset: Option<u64>,
    #[serde(default)]
    hs_bytes: Option<u64>,
    #[serde(default)]
    hs_shape: Option<Vec<usize>>,
    #[serde(default)]
    logit_offset: Option<u64>,
    #[serde(default)]
    logit_bytes: Option<u64>,
    #[serde(default)]
    logit_shape: Option<Vec<usize>>,
}

impl Line {
    /// Where this record's rows sit in the hidden-state (`logits` false) or logits sidecar.
    fn sidecar(&self, logits: bool) -> Option<(u64, u64, &[usize])> {
        if logits {
            Some((
                self.logit_offset?,
                self.logit_bytes?,
                self.logit_shape.as_deref()?,
            ))
        } else {
            Some((self.hs_offset?, self.hs_bytes?, self.hs_shape.as_deref()?))
        }
    }
}

struct Record {
    line: usize,
    l: Line,
}

struct RankFile {
    rank: u32,
    path: PathBuf,
    records: Vec<Record>,
}

/// Whether `dir` holds a Megatron routing trace.
pub(super) fn is_trace_dir(dir: &Path) -> bool {
    rank_files(dir).is_ok_and(|f| !f.is_empty())
}

fn rank_files(dir: &Path) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(r) = name
            .strip_prefix("router_trace_rank")
            .and_then(|s| s.strip_suffix(".jsonl"))
            .and_then(|s| s.parse::<u32>().ok())
        {
            out.push((r, p));
        }
    }
    out.sort();
    Ok(out)
}

fn read_rank(rank: u32, path: &Path) -> Result<RankFile> {
    let text = std::fs::read_to_string(path).map_err(|e| TraceError::io(path, e))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line)
            .map_err(|e| TraceError::parse(path, i + 1, e.to_string()))?;
        if l.block.as_deref().is_some_and(|b| b != "decoder") {
            continue;
        }
        if l.top_indices.len() != l.num_tokens {
            return Err(TraceError::parse(
                path,
                i + 1,
                format!(
                    "top_indices has {} rows, num_tokens is {}",
                    l.top_indices.len(),
                    l.num_tokens
                ),
            ));
        }
        if let Some(r) = l.top_indices.iter().position(|r| r.len() != l.topk) {
            return Err(TraceError::parse(
                path,
                i + 1,
                format!(
                    "token {r}: {} ids, topk is {}",
                    l.top_indices[r].len(),
                    l.topk
                ),
            ));
        }
        records.push(Record { line: i + 1, l });
    }
    Ok(RankFile {
        rank,
        path: path.to_path_buf(),
        records,
    })
}

/// A rank's bf16 sidecar file: hidden states (router inputs) or router logits.
struct Sidecar {
    path: PathBuf,
    bytes: Vec<u8>,
    logits: bool,
}

impl Sidecar {
    /// Reads `{stem}_rank{N}.bin` beside the rank's JSONL when `on`.
    fn open(rf: &RankFile, stem: &str, logits: bool, on: bool) -> Result<Sidecar> {
        let path = rf
            .path
            .with_file_name(format!("{stem}_rank{}.bin", rf.rank));
        let bytes = if on {
            std::fs::read(&path).map_err(|e| TraceError::io(&path, e))?
        } else {
            Vec::new()
        };
        Ok(Sidecar {
            path,
            bytes,
            logits,
        })
    }

    /// Record `r`'s rows `[num_tokens][width]`.
    fn rows(&self, rf: &RankFile, r: &Record) -> Result<Option<Vec<Vec<f32>>>> {
        let Some((off, len, shape)) = r.l.sidecar(self.logits) else {
            return Ok(None);
        };
        let at = |m: String| TraceError::parse(&rf.path, r.line, m);
        if shape.len() != 2 || shape[0] != r.l.num_tokens || len as usize != shape[0] * shape[1] * 2
        {
            return Err(at(format!(
                "sidecar shape {shape:?} / {len} bytes do not fit {} tokens of bf16",
                r.l.num_tokens
            )));
        }
        let end = off
            .checked_add(len)
            .filter(|&e| e as usize <= self.bytes.len())
            .ok_or_else(|| {
                at(format!(
                    "rows at bytes {off}..{} are past the end of {} ({} bytes): truncated sidecar",
                    off + len,
                    self.path.display(),
                    self.bytes.len()
                ))
            })?;
        let vals: Vec<f32> = self.bytes[off as usize..end as usize]
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        Ok(Some(
            vals.chunks_exact(shape[1]).map(<[f32]>::to_vec).collect(),
        ))
    }
}

/// Imports the trace directory `dir`.
pub(super) fn import(dir: &Path, opts: &ImportOptions) -> Result<Imported> {
    let files = rank_files(dir).map_err(|e| TraceError::io(dir, e))?;
    if files.is_empty() {
        return Err(TraceError::format(dir, "no router_trace_rank*.jsonl files"));
    }
    let mut notes = Vec::new();
    let mut kept: Vec<RankFile> = Vec::new();
    for (rank, path) in &files {
        let rf = read_rank(*rank, path)?;
        if let Some(twin) = kept.iter().find(|k| {
            k.records.len() == rf.records.len()
                && k.records.iter().zip(&rf.records).all(|(a, b)| a.l == b.l)
        }) {
            notes.push(format!(
                "{}: repeats rank {} (tensor-parallel twin): skipped",
                path.display(),
                twin.rank
            ));
            continue;
        }
        kept.push(rf);
    }
    let base = opts.layer_base.unwrap_or(0);
    let mut layers = std::collections::BTreeSet::new();
    let (mut topk, mut max_id, mut hidden) = (None, None::<u32>, None);
    for rf in &kept {
        for r in &rf.records {
            let l = r.l.layer.checked_sub(base).ok_or_else(|| {
                TraceError::parse(
                    &rf.path,
                    r.line,
                    format!("layer {} is below --layer-base {base}", r.l.layer),
                )
            })?;
            layers.insert(l);
            if *topk.get_or_insert(r.l.topk) != r.l.topk {
                return Err(TraceError::parse(
                    &rf.path,
                    r.line,
                    format!(
                        "topk {} differs from {} in earlier records",
                        r.l.topk,
                        topk.unwrap_or(0)
                    ),
                ));
            }
            max_id = r.l.top_indices.iter().flatten().copied().max().max(max_id);
            if let Some(s) = &r.l.hs_shape {
                if *hidden.get_or_insert(s.get(1).copied().unwrap_or(0))
                    != s.get(1).copied().unwrap_or(0)
                {
                    return Err(TraceError::parse(
                        &rf.path,
                        r.line,
                        format!("hs_shape {s:?} differs from earlier records"),
                    ));
                }
            }
        }
    }
    let moe_layers: Vec<u32> = layers.into_iter().collect();
    notes.push(format!(
        "{}: layer numbers read as {base}-based ({}); MoE layers {:?}",
        dir.display(),
        if base == 0 {
            "hook path; pass --layer-base 1 for the inference path's layer_number"
        } else {
            "layer_number"
        },
        moe_layers
    ));
    let all = |logits: bool| {
        kept.iter()
            .all(|rf| rf.records.iter().all(|r| r.l.sidecar(logits).is_some()))
    };
    let (with_inputs, with_logits) = (hidden.is_some() && all(false), all(true));
    let n_experts = resolve_n_experts(dir, opts.n_experts, max_id, &mut notes)?;
    let meta = TraceMeta {
        model: opts.model.clone().unwrap_or_else(|| super::stem(dir)),
        architecture: None,
        n_layers: moe_layers.last().map_or(0, |l| l + 1),
        moe_layers: moe_layers.clone(),
        n_experts,
        top_k: topk.unwrap_or(0) as u32,
        n_shared_experts: 0,
        source: Some("megatron router_trace".into()),
        tokenizer: None,
        ranked: false,
        expert_bytes: None,
        channels: [
            hidden
                .filter(|_| with_inputs)
                .map(|h| Channel::router_inputs(h as u32)),
            with_logits.then(|| Channel::router_logits(n_experts)),
        ]
        .into_iter()
        .flatten()
        .collect(),
    };
    let mut b =
        TraceBuilder::new(meta, false).map_err(|e| TraceError::format(dir, e.to_string()))?;
    for rf in &kept {
        let hidden_side = Sidecar::open(rf, "hidden_states", false, with_inputs)?;
        let logit_side = Sidecar::open(rf, "logits", true, with_logits)?;
        // (step, microbatch) -> layer -> record, in file order.
        let mut seqs: BTreeMap<(u64, usize), BTreeMap<u32, &Record>> = BTreeMap::new();
        let mut seen: BTreeMap<(u64, u32), usize> = BTreeMap::new();
        for r in &rf.records {
            let layer = r.l.layer - base;
            let mb = seen.entry((r.l.step, layer)).or_insert(0);
            seqs.entry((r.l.step, *mb)).or_default().insert(layer, r);
            *mb += 1;
        }
        for ((step, mb), per_layer) in &seqs {
            let first = per_layer.values().next().expect("non-empty");
            let n = first.l.num_tokens;
            if let Some(r) = per_layer.values().find(|r| r.l.num_tokens != n) {
                return Err(TraceError::parse(
                    &rf.path,
                    r.line,
                    format!(
                        "step {step} microbatch {mb}: {} tokens at layer {}, {n} at layer {}",
                        r.l.num_tokens, r.l.layer, first.l.layer
                    ),
                ));
            }
            let (mut inputs, mut logits) = (BTreeMap::new(), BTreeMap::new());
            for (&l, r) in per_layer {
                if with_inputs {
                    if let Some(rows) = hidden_side.rows(rf, r)? {
                        inputs.insert(l, rows);
                    }
                }
                if with_logits {
                    if let Some(rows) = logit_side.rows(rf, r)? {
                        logits.insert(l, rows);
                    }
                }
            }
            let at = |map: &BTreeMap<u32, Vec<Vec<f32>>>, t: usize| -> Vec<Option<Vec<f32>>> {
                moe_layers
                    .iter()
                    .map(|l| map.get(l).map(|x| x[t].clone()))
                    .collect()
            };
            for t in 0..n {
                let experts = moe_layers
                    .iter()
                    .map(|l| per_layer.get(l).map(|r| r.l.top_indices[t].clone()))
                    .collect();
                let mut channels = BTreeMap::new();
                if with_inputs {
                    channels.insert(ROUTER_INPUTS.to_string(), at(&inputs, t));
                }
                if with_logits {
                    channels.insert(ROUTER_LOGITS.to_string(), at(&logits, t));
                }
                let rec = TokenRecord {
                    seq: format!("rank{}/step{step}/mb{mb}", rf.rank),
                    pos: t as u32,
                    phase: Phase::Prefill,
                    token: None,
                    experts,
                    weights: None,
                    channels,
                };
                b.push(&rec).map_err(|e| {
                    TraceError::parse(&rf.path, first.line, format!("token {t}: {e}"))
                })?;
            }
        }
    }
    let trace = b.finish().map_err(|e| TraceError::format(dir, e))?;
    Ok(Imported { trace, notes })
}
