//! The interchange JSONL: the first line holds the meta, each further line one token.
//!
//! ```text
//! {"meta": {"model": "m", "n_layers": 4, "moe_layers": [1, 3], "n_experts": 8, "top_k": 2}}
//! {"seq": "a", "pos": 0, "phase": "prefill", "token": 17, "experts": [[3, 5], null], "weights": [[0.6, 0.4], null]}
//! ```
//!
//! The journal `moecast collect` streams sequences to has a `"collect"` object (its run
//! settings) beside `"meta"` on the first line, which readers ignore.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TraceError};
use crate::trace::{RoutingTrace, TokenRecord, TraceBuilder, TraceMeta};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetaLine {
    meta: TraceMeta,
    /// The settings of the `moecast collect` run whose journal this is; readers ignore it.
    #[serde(default, skip_serializing, rename = "collect")]
    _collect: Option<serde::de::IgnoredAny>,
}

/// Reads an interchange JSONL file, validating every line.
pub fn read_jsonl(path: &Path) -> Result<RoutingTrace> {
    let file = File::open(path).map_err(|e| TraceError::io(path, e))?;
    let mut lines = BufReader::new(file).lines().enumerate();
    let mut builder: Option<TraceBuilder> = None;
    let mut with_weights = None;
    while let Some((i, line)) = lines.next() {
        let line = line.map_err(|e| TraceError::io(path, e))?;
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        match &mut builder {
            None => {
                let head: MetaLine = serde_json::from_str(&line).map_err(|e| {
                    TraceError::parse(
                        path,
                        lineno,
                        format!("expected the meta line {{\"meta\": {{...}}}}: {e}"),
                    )
                })?;
                head.meta
                    .validate()
                    .map_err(|e| TraceError::parse(path, lineno, e.to_string()))?;
                // Peek at the first record to decide whether to keep a weights column.
                let first = lines.next();
                let first = match first {
                    Some((j, l)) => Some((j + 1, l.map_err(|e| TraceError::io(path, e))?)),
                    None => None,
                };
                let first_rec = match &first {
                    Some((j, l)) => Some((*j, parse_record(path, *j, l)?)),
                    None => None,
                };
                let weights = first_rec.as_ref().is_some_and(|(_, r)| r.weights.is_some());
                with_weights = Some(weights);
                let mut b = TraceBuilder::new(head.meta, weights)
                    .map_err(|e| TraceError::parse(path, lineno, e.to_string()))?;
                if let Some((j, rec)) = first_rec {
                    b.push(&rec).map_err(|e| TraceError::parse(path, j, e))?;
                }
                builder = Some(b);
            }
            Some(b) => {
                let rec = parse_record(path, lineno, &line)?;
                if rec.weights.is_some() != with_weights.unwrap_or(false) {
                    return Err(TraceError::parse(
                        path,
                        lineno,
                        "\"weights\" must be given on every line or on none",
                    ));
                }
                b.push(&rec)
                    .map_err(|e| TraceError::parse(path, lineno, e))?;
            }
        }
    }
    let builder = builder.ok_or_else(|| TraceError::format(path, "empty file"))?;
    builder.finish().map_err(|e| TraceError::format(path, e))
}

fn parse_record(path: &Path, lineno: usize, line: &str) -> Result<TokenRecord> {
    serde_json::from_str(line).map_err(|e| TraceError::parse(path, lineno, e.to_string()))
}

/// Writes `trace` as interchange JSONL.
pub fn write_jsonl<W: Write>(trace: &RoutingTrace, out: &mut W) -> Result<()> {
    let io = |e: std::io::Error| TraceError::Io {
        path: "<output>".into(),
        source: e,
    };
    let meta = MetaLine {
        meta: trace.meta.clone(),
        _collect: None,
    };
    serde_json::to_writer(&mut *out, &meta).map_err(|e| io(e.into()))?;
    out.write_all(b"\n").map_err(io)?;
    let view = trace.view();
    for t in 0..trace.n_tokens() {
        serde_json::to_writer(&mut *out, &view.record(t)).map_err(|e| io(e.into()))?;
        out.write_all(b"\n").map_err(io)?;
    }
    Ok(())
}
