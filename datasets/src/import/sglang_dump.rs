//! SGLang's expert-distribution recorder in `per_token` mode
//! (`--expert-distribution-recorder-mode per_token`, `/dump_expert_distribution_record`;
//! `python/sglang/srt/eplb/expert_distribution.py`): one `torch.save` file per rank,
//! `expert_distribution_recorder_{time}_{rank}.pt`, read with the `pytorch-reader` crate.
//!
//! The file holds `records`, one per forward pass: `input_ids`, `positions`,
//! `extend_seq_lens` (`None` for a decode pass), `forward_mode` (1 extend, 2 decode,
//! 3 mixed, 4 idle), `rank`, and `topk_ids_of_layer` `[layers, tokens, 8]` of physical
//! expert ids, `-1` in unused slots (a layer no token routed through is a dense layer);
//! and `last_physical_to_logical_map` `[layers, physical]`, which turns physical ids
//! (EPLB replicas) back into the model's logical experts.
//!
//! The records do not name requests. Sequences are rebuilt per rank by position
//! continuity in batch order: a pass's segment (an extend chunk, or one decode token)
//! continues the first open sequence, in the running batch's order, whose next position
//! is the segment's first; otherwise it starts a new sequence (`rank{r}/req{n}`). A
//! decoding request missing from a decode pass has finished and takes no more tokens.
//! SGLang keeps the running batch in order, so this is exact unless two requests sit at
//! the same position and the earlier of them finishes first. Records that another rank
//! wrote identically (tensor-parallel twins) are dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pytorch_reader::{DType, PickleValue, PytorchReader};

use super::{stem, ImportOptions, Imported};
use crate::error::{Result, TraceError};
use crate::trace::{Phase, TokenRecord, TraceBuilder, TraceMeta};

/// The dump files of a directory: `expert_distribution_recorder_*.pt`, sorted.
pub(super) fn dump_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("expert_distribution_recorder_") && n.ends_with(".pt")
            })
        })
        .collect();
    out.sort();
    out
}

/// Whether `path` starts like a `torch.save` ZIP archive.
pub(super) fn sniff(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04")
}

/// One forward pass as read from a dump.
struct Pass {
    file: PathBuf,
    index: usize,
    rank: i64,
    id: i64,
    input_ids: Vec<i64>,
    positions: Vec<i64>,
    segments: Vec<usize>,
    mode: i64,
    /// `[layers, tokens, slots]` physical ids.
    topk: Vec<i64>,
    layers: usize,
    slots: usize,
}

fn int_list(v: Option<&PickleValue>) -> Option<Vec<i64>> {
    match v? {
        PickleValue::List(items) => items
            .iter()
            .map(|x| match x {
                PickleValue::Int(i) => Some(*i),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn int(v: Option<&PickleValue>) -> Option<i64> {
    match v? {
        PickleValue::Int(i) => Some(*i),
        _ => None,
    }
}

/// An integer tensor's shape and values.
type IntTensor = (Vec<usize>, Vec<i64>);

/// Reads an integer tensor as i64 values with its shape.
fn int_tensor(reader: &PytorchReader, name: &str) -> std::result::Result<IntTensor, String> {
    let t = reader
        .get(name)
        .ok_or_else(|| format!("no tensor '{name}'"))?;
    let bytes = t.read().map_err(|e| e.to_string())?;
    let values = match t.dtype() {
        DType::I64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect(),
        DType::I32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as i64)
            .collect(),
        DType::I16 => bytes
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes(c.try_into().unwrap_or_default()) as i64)
            .collect(),
        other => {
            return Err(format!(
                "tensor '{name}' has dtype {other:?}, expected integers"
            ))
        }
    };
    Ok((t.shape().to_vec(), values))
}

/// Reads every record of one dump file, and its physical-to-logical map.
fn read_dump(path: &Path) -> Result<(Vec<Pass>, Option<IntTensor>)> {
    let fail = |m: String| TraceError::format(path, m);
    let pe = |e: pytorch_reader::PytorchError| fail(format!("not a readable torch.save file: {e}"));
    let tree = PytorchReader::read_pickle_data(path, None).map_err(pe)?;
    let reader = PytorchReader::new(path).map_err(pe)?;
    let PickleValue::Dict(root) = &tree else {
        return Err(fail("the dump's root is not a dictionary".into()));
    };
    let Some(PickleValue::List(records)) = root.get("records") else {
        return Err(fail(
            "no 'records' list: not a per_token expert-distribution dump (record with --expert-distribution-recorder-mode per_token)".into(),
        ));
    };
    let map = match root.get("last_physical_to_logical_map") {
        Some(_) => Some(int_tensor(&reader, "last_physical_to_logical_map").map_err(fail)?),
        None => None,
    };
    let mut out = Vec::with_capacity(records.len());
    for (i, rec) in records.iter().enumerate() {
        let rfail = |m: String| TraceError::format(path, format!("record {i}: {m}"));
        let PickleValue::Dict(rec) = rec else {
            return Err(rfail("not a dictionary".into()));
        };
        let need =
            |k: &str| int_list(rec.get(k)).ok_or_else(|| rfail(format!("no integer list '{k}'")));
        let input_ids = need("input_ids")?;
        let positions = need("positions")?;
        let mode = int(rec.get("forward_mode")).ok_or_else(|| rfail("no 'forward_mode'".into()))?;
        let n = input_ids.len();
        if positions.len() != n {
            return Err(rfail(format!(
                "{} positions for {n} input_ids",
                positions.len()
            )));
        }
        let segments = match (mode, int_list(rec.get("extend_seq_lens"))) {
            (2, _) => vec![1; n],
            (1 | 3, Some(lens)) => lens.iter().map(|&l| l.max(0) as usize).collect(),
            (4, _) => Vec::new(),
            (1 | 3, None) => return Err(rfail("an extend pass without extend_seq_lens".into())),
            (m, _) => {
                return Err(rfail(format!(
                    "forward_mode {m} (speculative decoding / disaggregation) is not supported"
                )))
            }
        };
        if mode != 4 && segments.iter().sum::<usize>() != n {
            return Err(rfail(format!(
                "extend_seq_lens sum to {}, the pass has {n} tokens",
                segments.iter().sum::<usize>()
            )));
        }
        let (shape, topk) = if n == 0 {
            (vec![0, 0, 0], Vec::new())
        } else {
            int_tensor(&reader, &format!("records.{i}.topk_ids_of_layer")).map_err(rfail)?
        };
        if n > 0 && (shape.len() != 3 || shape[1] != n) {
            return Err(rfail(format!(
                "topk_ids_of_layer has shape {shape:?}, expected [layers, {n}, slots]"
            )));
        }
        out.push(Pass {
            file: path.to_path_buf(),
            index: i,
            rank: int(rec.get("rank")).unwrap_or(0),
            id: int(rec.get("forward_pass_id")).unwrap_or(i as i64),
            input_ids,
            positions,
            segments,
            mode,
            topk,
            layers: shape[0],
            slots: shape[2],
        });
    }
    Ok((out, map))
}

fn record_error(p: &Pass, msg: String) -> TraceError {
    TraceError::format(&p.file, format!("record {}: {msg}", p.index))
}

impl Pass {
    /// The slots of token `t` at layer `l`.
    fn row(&self, l: usize, t: usize) -> &[i64] {
        &self.topk[(l * self.input_ids.len() + t) * self.slots..][..self.slots]
    }
}

/// One rebuilt request: its tokens as (pass index, token index in the pass, phase).
struct Request {
    rank: i64,
    next_pos: i64,
    tokens: Vec<(usize, usize, Phase)>,
}

/// Imports the dump files (`path` is one file or a directory of them, one per rank).
pub(super) fn import(path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let files = if path.is_dir() {
        dump_files(path)
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        return Err(TraceError::format(
            path,
            "no expert_distribution_recorder_*.pt files",
        ));
    }
    let mut notes = Vec::new();
    let mut passes: Vec<Pass> = Vec::new();
    let mut map: Option<(PathBuf, Vec<usize>, Vec<i64>)> = None;
    for f in &files {
        let (p, m) = read_dump(f)?;
        passes.extend(p);
        if let (None, Some((shape, values))) = (&map, m) {
            map = Some((f.clone(), shape, values));
        }
    }
    // Tensor-parallel twins: the same pass written by another rank.
    let mut seen: HashMap<(i64, &[i64], &[i64]), usize> = HashMap::new();
    let mut keep = vec![true; passes.len()];
    for (i, p) in passes.iter().enumerate() {
        match seen.get(&(p.id, p.input_ids.as_slice(), p.positions.as_slice())) {
            Some(&j) if passes[j].rank != p.rank && passes[j].topk == p.topk => keep[i] = false,
            _ => {
                seen.insert((p.id, &p.input_ids, &p.positions), i);
            }
        }
    }
    let dropped = keep.iter().filter(|k| !**k).count();
    if dropped > 0 {
        notes.push(format!(
            "{}: {dropped} records repeat another rank's (tensor-parallel twins): dropped",
            path.display()
        ));
    }
    let mut order: Vec<usize> = (0..passes.len()).filter(|&i| keep[i]).collect();
    order.sort_by_key(|&i| (passes[i].rank, passes[i].id, i));
    let Some(first) = order
        .iter()
        .map(|&i| &passes[i])
        .find(|p| !p.input_ids.is_empty())
    else {
        return Err(TraceError::format(path, "no tokens in any record"));
    };
    let (layers, slots) = (first.layers, first.slots);
    for &i in &order {
        let p = &passes[i];
        if !p.input_ids.is_empty() && (p.layers, p.slots) != (layers, slots) {
            return Err(record_error(
                p,
                format!(
                    "{} layers x {} slots, the first record {layers} x {slots}",
                    p.layers, p.slots
                ),
            ));
        }
    }
    if let Some((mf, shape, _)) = &map {
        if shape.len() != 2 || shape[0] != layers {
            return Err(TraceError::format(
                mf,
                format!(
                    "last_physical_to_logical_map has shape {shape:?}, expected [{layers}, physical]"
                ),
            ));
        }
    }
    // Dense layers: never routed; top-k: the used slots of a routed row.
    let routed: Vec<bool> = (0..layers)
        .map(|l| {
            order.iter().any(|&i| {
                let p = &passes[i];
                (0..p.input_ids.len()).any(|t| p.row(l, t).iter().any(|&x| x >= 0))
            })
        })
        .collect();
    let moe_layers: Vec<u32> = (0..layers as u32).filter(|&l| routed[l as usize]).collect();
    if moe_layers.is_empty() {
        return Err(TraceError::format(path, "no layer holds an expert id"));
    }
    if moe_layers.len() < layers {
        notes.push(format!(
            "{}: layers {:?} hold no expert ids (dense): MoE layers {moe_layers:?}",
            path.display(),
            (0..layers).filter(|&l| !routed[l]).collect::<Vec<_>>()
        ));
    }
    let (moe_layers, n_layers) = match &opts.moe_layers {
        Some(list) if list.len() != moe_layers.len() => {
            return Err(TraceError::format(
                path,
                format!(
                    "--moe-layers names {} layers, the dump routes {}",
                    list.len(),
                    moe_layers.len()
                ),
            ))
        }
        Some(list) => (
            list.clone(),
            (layers as u32).max(list.iter().max().map_or(0, |m| m + 1)),
        ),
        None => (moe_layers, layers as u32),
    };
    let axis: Vec<usize> = (0..layers).filter(|&l| routed[l]).collect();
    let logical = |p: &Pass, l: usize, phys: i64, t: usize| -> Result<u32> {
        let bad = |m: String| record_error(p, format!("token {t}, layer {l}: {m}"));
        match &map {
            None => Ok(phys as u32),
            Some((_, shape, values)) => {
                if phys as usize >= shape[1] {
                    return Err(bad(format!(
                        "physical expert {phys} >= {} in the map",
                        shape[1]
                    )));
                }
                let v = values[l * shape[1] + phys as usize];
                u32::try_from(v).map_err(|_| bad(format!("maps to logical expert {v}")))
            }
        }
    };
    if map.is_none() {
        notes.push(format!(
            "{}: no last_physical_to_logical_map: physical ids are taken as logical",
            path.display()
        ));
    }
    // Rebuild requests per rank.
    let mut requests: Vec<Request> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let mut rank = None;
    for &i in &order {
        let p = &passes[i];
        if rank != Some(p.rank) {
            rank = Some(p.rank);
            open.clear();
        }
        let mut used = vec![false; open.len()];
        let mut seen_now: Vec<usize> = Vec::new();
        let mut start = 0;
        for &len in &p.segments {
            if len == 0 {
                continue;
            }
            let pos = p.positions[start];
            let slot = (0..open.len()).find(|&j| !used[j] && requests[open[j]].next_pos == pos);
            let r = match slot {
                Some(j) => {
                    used[j] = true;
                    open[j]
                }
                None => {
                    requests.push(Request {
                        rank: p.rank,
                        next_pos: pos,
                        tokens: Vec::new(),
                    });
                    requests.len() - 1
                }
            };
            let continues = slot.is_some();
            for t in start..start + len {
                if t > start && p.positions[t] != p.positions[t - 1] + 1 {
                    return Err(record_error(
                        p,
                        format!(
                            "positions jump from {} to {} inside one extend segment",
                            p.positions[t - 1],
                            p.positions[t]
                        ),
                    ));
                }
                let phase = match p.mode {
                    2 => Phase::Decode,
                    3 if len == 1 && continues => Phase::Decode,
                    _ => Phase::Prefill,
                };
                requests[r].tokens.push((i, t, phase));
            }
            requests[r].next_pos = p.positions[start + len - 1] + 1;
            seen_now.push(r);
            start += len;
        }
        // The running batch: this pass's requests first for a decode pass; new prefills
        // join after the running ones.
        let mut next: Vec<usize> = if p.mode == 2 {
            seen_now.clone()
        } else {
            open.iter()
                .copied()
                .filter(|r| seen_now.contains(r))
                .collect()
        };
        for &r in open.iter().chain(&seen_now) {
            if !next.contains(&r) {
                next.push(r);
            }
        }
        // Every running request decodes in a decode (or mixed) pass: one that was
        // decoding and is missing has finished, and must not take a later request's
        // segment that happens to start at its next position.
        if matches!(p.mode, 2 | 3) {
            next.retain(|&r| {
                seen_now.contains(&r)
                    || requests[r]
                        .tokens
                        .last()
                        .is_some_and(|&(_, _, phase)| phase == Phase::Prefill)
            });
        }
        open = next;
    }
    let k = {
        let p = first;
        (0..p.input_ids.len())
            .find_map(|t| {
                let row = p.row(axis[0], t);
                row.iter()
                    .any(|&x| x >= 0)
                    .then(|| row.iter().filter(|&&x| x >= 0).count())
            })
            .unwrap_or(0)
    };
    let mut max_logical = 0u32;
    let mut records: Vec<TokenRecord> = Vec::new();
    let mut counter: HashMap<i64, usize> = HashMap::new();
    for req in &requests {
        let n = counter.entry(req.rank).or_insert(0);
        let name = format!("rank{}/req{n}", req.rank);
        *n += 1;
        for &(i, t, phase) in &req.tokens {
            let p = &passes[i];
            let mut experts = Vec::with_capacity(axis.len());
            for &l in &axis {
                let row = p.row(l, t);
                let ids: Vec<i64> = row.iter().copied().filter(|&x| x >= 0).collect();
                if ids.is_empty() {
                    experts.push(None);
                    continue;
                }
                if ids.len() != k || row[..k].iter().any(|&x| x < 0) {
                    return Err(record_error(
                        p,
                        format!(
                            "token {t}, layer {l}: {} expert ids, others have {k}",
                            ids.len()
                        ),
                    ));
                }
                let mut out = Vec::with_capacity(k);
                for &x in &ids {
                    let e = logical(p, l, x, t)?;
                    max_logical = max_logical.max(e);
                    out.push(e);
                }
                experts.push(Some(out));
            }
            records.push(TokenRecord {
                seq: name.clone(),
                pos: p.positions[t].max(0) as u32,
                phase,
                token: u32::try_from(p.input_ids[t]).ok(),
                experts,
                weights: None,
                channels: Default::default(),
            });
        }
    }
    let n_experts = match (opts.n_experts, &map) {
        (Some(e), _) => e,
        (None, Some((_, _, values))) => values.iter().copied().max().unwrap_or(0).max(0) as u32 + 1,
        (None, None) => max_logical + 1,
    };
    let meta = TraceMeta {
        channels: Vec::new(),
        model: stem(path),
        architecture: None,
        n_layers,
        moe_layers,
        n_experts,
        top_k: k as u32,
        n_shared_experts: 0,
        source: Some("sglang".into()),
        tokenizer: None,
        ranked: true,
        expert_bytes: None,
    };
    let fail = |m: String| TraceError::format(path, m);
    let mut b = TraceBuilder::new(meta, false).map_err(|e| fail(e.to_string()))?;
    for rec in &records {
        b.push(rec)
            .map_err(|e| fail(format!("{} position {}: {e}", rec.seq, rec.pos)))?;
    }
    let trace = b.finish().map_err(fail)?;
    Ok(Imported { trace, notes })
}
