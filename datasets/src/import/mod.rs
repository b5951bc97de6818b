//! Importers for the routing formats real engines emit, with format auto-detection.
//!
//! | format | `--from` | source |
//! |---|---|---|
//! | route_trace v1 CSV | `route-csv` | llama.cpp-based engines |
//! | warp JSONL | `warp` | one line per decode step, ids sorted |
//! | RouterTrace v2 JSON | `router-trace-v2` | transformers capture with prompt spans |
//! | interchange JSONL | `jsonl` | moecast's own export (also `.mctrace` / `.parquet` traces) |
//! | hook JSONL | `hook-jsonl` | vLLM / HF forward hooks, one line per (token, layer) |
//! | vLLM returned routing | `vllm` | completion responses (base64 `.npy` or nested lists), `.npy` arrays |
//! | SGLang returned routing | `sglang` | `meta_info.routed_experts` (base64 raw int32) |
//! | SGLang expert-distribution dump | `sglang-dump` | `per_token` recorder `.pt` files (a file, or a directory of ranks) |
//! | Megatron-LM router trace | `megatron` | a `--moe-routing-trace-path` directory (all ranks) |
//!
//! A directory input is a Megatron trace directory or a directory of SGLang dumps (all
//! ranks merged), or else a directory of files (saved responses, one request each),
//! imported in name order.

mod hook_jsonl;
mod megatron;
mod route_csv;
mod router_trace_v2;
mod serving;
mod sglang_dump;
mod warp;

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Result, TraceError};
use crate::trace::RoutingTrace;

/// The importable formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    RouteCsv,
    Warp,
    RouterTraceV2,
    Jsonl,
    HookJsonl,
    Vllm,
    Sglang,
    SglangDump,
    Megatron,
}

impl ImportFormat {
    /// All formats with their `--from` names.
    pub const ALL: [(ImportFormat, &'static str); 9] = [
        (ImportFormat::RouteCsv, "route-csv"),
        (ImportFormat::Warp, "warp"),
        (ImportFormat::RouterTraceV2, "router-trace-v2"),
        (ImportFormat::Jsonl, "jsonl"),
        (ImportFormat::HookJsonl, "hook-jsonl"),
        (ImportFormat::Vllm, "vllm"),
        (ImportFormat::Sglang, "sglang"),
        (ImportFormat::SglangDump, "sglang-dump"),
        (ImportFormat::Megatron, "megatron"),
    ];

    /// The `--from` name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(f, _)| *f == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    /// Parses a `--from` name.
    pub fn parse(name: &str) -> Option<ImportFormat> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(f, _)| *f)
    }

    /// Guesses the format of `path` from its first bytes.
    pub fn detect(path: &Path) -> Result<ImportFormat> {
        if path.is_dir() && megatron::is_trace_dir(path) {
            return Ok(ImportFormat::Megatron);
        }
        if path.is_dir() && !sglang_dump::dump_files(path).is_empty() {
            return Ok(ImportFormat::SglangDump);
        }
        let mut head = Vec::with_capacity(8192);
        std::fs::File::open(path)
            .and_then(|f| f.take(8192).read_to_end(&mut head))
            .map_err(|e| TraceError::io(path, e))?;
        let text = String::from_utf8_lossy(&head);
        let text = text.trim_start();
        if text.is_empty() {
            return Err(TraceError::format(path, "empty file"));
        }
        if sglang_dump::sniff(&head) {
            return Ok(ImportFormat::SglangDump);
        }
        if matches!(
            crate::store::TraceFormat::of_head(&head),
            Some(crate::store::TraceFormat::Binary | crate::store::TraceFormat::Parquet)
        ) {
            return Ok(ImportFormat::Jsonl);
        }
        if serving::sniff(&head, text) {
            return Ok(if text.contains("\"meta_info\"") {
                ImportFormat::Sglang
            } else {
                ImportFormat::Vllm
            });
        }
        if text.starts_with("# route_trace") || text.starts_with("turn,phase") {
            return Ok(ImportFormat::RouteCsv);
        }
        let first_line = text.lines().next().unwrap_or("");
        if let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(first_line) {
            if obj.contains_key("meta") {
                return Ok(ImportFormat::Jsonl);
            }
            if obj.contains_key("tok") && obj.contains_key("layers") {
                return Ok(ImportFormat::Warp);
            }
            if obj.contains_key("layer") && obj.contains_key("experts") {
                return Ok(ImportFormat::HookJsonl);
            }
            if obj.contains_key("selections") {
                return Ok(ImportFormat::RouterTraceV2);
            }
        }
        if text.starts_with('{') && text.contains("\"selections\"")
            || text.contains("\"expertsPerLayer\"")
        {
            return Ok(ImportFormat::RouterTraceV2);
        }
        let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
        Err(TraceError::format(
            path,
            format!(
                "cannot detect the trace format; pass --from with one of: {}",
                names.join(", ")
            ),
        ))
    }
}

/// What the user can tell an importer that the file itself may not say.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Model name to record (default: from the file, else its stem).
    pub model: Option<String>,
    /// Experts per layer, for formats that do not record it (default: largest id + 1).
    pub n_experts: Option<u32>,
    /// Experts per token, for formats that do not record it (SGLang).
    pub top_k: Option<u32>,
    /// Number of the first layer in Megatron traces (0: the hook path, default; 1: the
    /// inference path's `layer_number`).
    pub layer_base: Option<u32>,
    /// Model layer numbers of the MoE layers, for vLLM / SGLang arrays whose layer axis
    /// holds only the MoE layers (or, with every layer on the axis, which are MoE).
    pub moe_layers: Option<Vec<u32>>,
}

/// Parses a layer list such as `3-60` or `1,3,5-7` (ascending, no repeats).
pub fn parse_layer_list(s: &str) -> std::result::Result<Vec<u32>, String> {
    let mut out: Vec<u32> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let num = |x: &str| {
            x.trim()
                .parse::<u32>()
                .map_err(|_| format!("'{x}' in layer list '{s}' is not a layer number"))
        };
        let (lo, hi) = match item.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(item)?, num(item)?),
        };
        if lo > hi || out.last().is_some_and(|&last| lo <= last) {
            return Err(format!(
                "layer list '{s}' must be ascending without repeats"
            ));
        }
        out.extend(lo..=hi);
    }
    if out.is_empty() {
        return Err("empty layer list".into());
    }
    Ok(out)
}

/// A finished import: the trace and notes for the user (inferred fields, sidecars).
#[derive(Debug)]
pub struct Imported {
    pub trace: RoutingTrace,
    pub notes: Vec<String>,
}

/// Imports one or more files (each in `format`, or auto-detected) into one trace.
/// Files must describe the same model shape; clashing sequence names are prefixed with
/// the file stem.
pub fn import(
    inputs: &[PathBuf],
    format: Option<ImportFormat>,
    opts: &ImportOptions,
) -> Result<Imported> {
    let mut parts = Vec::new();
    let mut notes = Vec::new();
    for path in input_files(inputs, format)? {
        let part = import_file(&path, format, opts)?;
        notes.extend(part.notes);
        parts.push((path, part.trace));
    }
    let trace = concat(parts)?;
    Ok(Imported { trace, notes })
}

/// Imports the files one at a time into a dataset (memory holds one input file and one
/// part), all into the partition of the first file's model (or `opts.model`) and
/// source; `progress(done, total)` is called after each file. Returns the notes.
pub fn import_to_dataset(
    inputs: &[PathBuf],
    format: Option<ImportFormat>,
    opts: &ImportOptions,
    writer: &mut crate::dataset::DatasetWriter,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<String>> {
    let files = input_files(inputs, format)?;
    let mut notes = Vec::new();
    // Like `import`, one import is one model: the first file's name, unless given.
    let mut opts = opts.clone();
    for (i, path) in files.iter().enumerate() {
        let mut part = import_file(path, format, &opts)?;
        notes.append(&mut part.notes);
        if opts.model.is_none() {
            opts.model = Some(part.trace.meta.model.clone());
        }
        writer.push(part.trace, path)?;
        progress(i + 1, files.len());
    }
    Ok(notes)
}

/// The files to import: the inputs, with each directory that is not a Megatron trace
/// directory replaced by its files in name order.
fn input_files(inputs: &[PathBuf], format: Option<ImportFormat>) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in inputs {
        // Directories whose files make one trace together (ranks of one job).
        let merged = format.map_or_else(
            || megatron::is_trace_dir(path) || !sglang_dump::dump_files(path).is_empty(),
            |f| matches!(f, ImportFormat::Megatron | ImportFormat::SglangDump),
        );
        if path.is_dir() && !merged {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| TraceError::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            inner.sort();
            if inner.is_empty() {
                return Err(TraceError::format(path, "empty directory"));
            }
            files.extend(inner);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Imports one file in `format`, or in the format detected from its content (noted).
pub fn import_file(
    path: &Path,
    format: Option<ImportFormat>,
    opts: &ImportOptions,
) -> Result<Imported> {
    let (fmt, note) = match format {
        Some(f) => (f, None),
        None => {
            let f = ImportFormat::detect(path)?;
            let name = match f {
                ImportFormat::Jsonl => match crate::store::TraceFormat::sniff(path)? {
                    Some(crate::store::TraceFormat::Binary) => "a moecast trace (.mctrace)",
                    Some(crate::store::TraceFormat::Parquet) => "a moecast trace (Parquet)",
                    _ => "jsonl (a moecast trace)",
                },
                other => other.name(),
            };
            (
                f,
                Some(format!("{}: detected format {name}", path.display())),
            )
        }
    };
    let mut imported = import_one(path, fmt, opts)?;
    imported.notes.splice(0..0, note);
    Ok(imported)
}

fn import_one(path: &Path, format: ImportFormat, opts: &ImportOptions) -> Result<Imported> {
    let mut imported = match format {
        ImportFormat::RouteCsv => route_csv::import(path)?,
        ImportFormat::Warp => warp::import(path, opts)?,
        ImportFormat::RouterTraceV2 => router_trace_v2::import(path)?,
        ImportFormat::HookJsonl => hook_jsonl::import(path, opts)?,
        ImportFormat::Vllm | ImportFormat::Sglang => serving::import(path, opts)?,
        ImportFormat::Megatron => megatron::import(path, opts)?,
        ImportFormat::SglangDump => sglang_dump::import(path, opts)?,
        ImportFormat::Jsonl => Imported {
            trace: match crate::store::TraceFormat::sniff(path)? {
                Some(crate::store::TraceFormat::Binary | crate::store::TraceFormat::Parquet) => {
                    crate::store::load_trace(path)?
                }
                _ => crate::jsonl::read_jsonl(path)?,
            },
            notes: Vec::new(),
        },
    };
    if let Some(m) = &opts.model {
        imported.trace.meta.model = m.clone();
    }
    Ok(imported)
}

/// File stem of `path`, used as a default model or sequence name.
pub(crate) fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "trace".into())
}

/// The expert count to record: the user's, else the largest id seen + 1 (with a note).
pub(crate) fn resolve_n_experts(
    path: &Path,
    given: Option<u32>,
    max_id: Option<u32>,
    notes: &mut Vec<String>,
) -> Result<u32> {
    match (given, max_id) {
        (Some(e), _) => Ok(e),
        (None, Some(m)) => {
            notes.push(format!(
                "{}: the format does not record the expert count; using the largest id + 1 = {} (pass --n-experts to set it)",
                path.display(),
                m + 1
            ));
            Ok(m + 1)
        }
        (None, None) => Err(TraceError::format(path, "no routing found")),
    }
}

/// Concatenates traces of one model shape (the first error names the file that
/// differs); clashing sequence names are prefixed with the file stem.
pub(crate) fn concat(parts: Vec<(PathBuf, RoutingTrace)>) -> Result<RoutingTrace> {
    let mut iter = parts.into_iter();
    let (_, mut out) = iter
        .next()
        .ok_or_else(|| TraceError::Invalid("no input files".into()))?;
    let mut names: HashSet<String> = out.seq_names.iter().cloned().collect();
    for (path, t) in iter {
        if !out.meta.same_shape(&t.meta) {
            return Err(TraceError::format(
                &path,
                format!(
                    "model shape differs from the first input (layers {}, MoE layers {:?}, E {}, k {} vs layers {}, MoE layers {:?}, E {}, k {})",
                    t.meta.n_layers, t.meta.moe_layers, t.meta.n_experts, t.meta.top_k,
                    out.meta.n_layers, out.meta.moe_layers, out.meta.n_experts, out.meta.top_k
                ),
            ));
        }
        out.meta.ranked &= t.meta.ranked;
        let base = out.seq_names.len() as u32;
        for name in &t.seq_names {
            let mut n = name.clone();
            if names.contains(&n) {
                n = format!("{}:{name}", stem(&path));
            }
            names.insert(n.clone());
            out.seq_names.push(n);
        }
        out.seq.extend(t.seq.iter().map(|s| s + base));
        out.pos.extend(&t.pos);
        out.token.extend(&t.token);
        out.phase.extend(&t.phase);
        out.experts.extend(&t.experts);
        let k = out.meta.top_k as usize;
        // Channels both traces carry alike are kept, the others dropped.
        let (mut channels, mut values) = (Vec::new(), Vec::new());
        let theirs: Vec<_> = t.meta.channels.iter().zip(t.channels).collect();
        for (c, mut a) in out.meta.channels.drain(..).zip(out.channels.drain(..)) {
            if let Some((_, b)) = theirs.iter().find(|(o, _)| **o == c) {
                if a.append(b) {
                    channels.push(c);
                    values.push(a);
                }
            }
        }
        out.meta.channels = channels;
        out.channels = values;
        out.weights = match (out.weights.take(), t.weights) {
            (None, None) => None,
            (a, b) => {
                let n_before = out.experts.len() - t.experts.len();
                let mut w = a.unwrap_or_else(|| vec![f32::NAN; n_before]);
                w.extend(b.unwrap_or_else(|| vec![f32::NAN; t.experts.len()]));
                debug_assert_eq!(w.len() % k, 0);
                Some(w)
            }
        };
    }
    out.validate()?;
    Ok(out)
}
