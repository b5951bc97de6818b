//! Loading and saving traces in any of the three forms, chosen by the file's content
//! (reading) or extension (writing), and the atomic-write helper every writer uses.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use crate::error::{Result, TraceError};
use crate::trace::RoutingTrace;
use crate::{binary, jsonl, parquet};

/// The storage forms of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceFormat {
    /// The memory-mapped binary form (`.mctrace`).
    Binary,
    /// Parquet, one row per (token, MoE layer) (`.parquet`).
    Parquet,
    /// The interchange JSONL (`.jsonl`).
    Jsonl,
}

impl TraceFormat {
    /// Picks the format from a file name's extension.
    pub fn from_extension(path: &Path) -> Option<TraceFormat> {
        match path.extension()?.to_str()? {
            "mctrace" => Some(TraceFormat::Binary),
            "parquet" | "pq" => Some(TraceFormat::Parquet),
            "jsonl" | "ndjson" => Some(TraceFormat::Jsonl),
            _ => None,
        }
    }

    /// Picks the format from the first bytes of a file.
    pub fn sniff(path: &Path) -> Result<Option<TraceFormat>> {
        let mut head = [0u8; 8];
        let mut f = File::open(path).map_err(|e| TraceError::io(path, e))?;
        let n = read_up_to(&mut f, &mut head).map_err(|e| TraceError::io(path, e))?;
        Ok(TraceFormat::of_head(&head[..n]))
    }

    /// Picks the format from a file's first bytes (at least 8 of them).
    pub fn of_head(head: &[u8]) -> Option<TraceFormat> {
        if head.starts_with(binary::MAGIC) {
            Some(TraceFormat::Binary)
        } else if head.starts_with(b"PAR1") {
            Some(TraceFormat::Parquet)
        } else if head.trim_ascii_start().starts_with(b"{\"meta\"") {
            Some(TraceFormat::Jsonl)
        } else {
            None
        }
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            r => n += r,
        }
    }
    Ok(n)
}

/// A trace opened for reading: memory-mapped when it is in the binary form, read into
/// memory otherwise. Either way [`OpenedTrace::view`] gives the same column view.
#[derive(Debug)]
pub enum OpenedTrace {
    Mapped(binary::MappedTrace),
    Owned(RoutingTrace),
}

impl OpenedTrace {
    /// The column view of the trace.
    pub fn view(&self) -> crate::trace::TraceView<'_> {
        match self {
            OpenedTrace::Mapped(m) => m.view(),
            OpenedTrace::Owned(t) => t.view(),
        }
    }

    /// The trace as an owned value (copies a mapped trace).
    pub fn into_owned(self) -> RoutingTrace {
        match self {
            OpenedTrace::Mapped(m) => m.view().to_owned_trace(),
            OpenedTrace::Owned(t) => t,
        }
    }
}

/// Opens a trace in any storage form (detected from its content): `.mctrace` files are
/// memory-mapped, Parquet and JSONL are read into memory.
pub fn open_trace(path: &Path) -> Result<OpenedTrace> {
    if path.is_dir() {
        return Err(TraceError::format(
            path,
            "is a folder: `trace stats`, `trace info`, `simulate`, `train` and `eval` read \
             dataset folders; this command takes one trace file (for example one part)",
        ));
    }
    match TraceFormat::sniff(path)? {
        Some(TraceFormat::Binary) => Ok(OpenedTrace::Mapped(binary::MappedTrace::open(path)?)),
        Some(TraceFormat::Parquet) => Ok(OpenedTrace::Owned(parquet::read_parquet(path)?)),
        Some(TraceFormat::Jsonl) => Ok(OpenedTrace::Owned(jsonl::read_jsonl(path)?)),
        None => Err(TraceError::format(
            path,
            "not a moecast trace (expected .mctrace, Parquet or interchange JSONL); \
             use `moecast trace import` for engine formats",
        )),
    }
}

/// Reads a trace in any storage form into memory.
pub fn load_trace(path: &Path) -> Result<RoutingTrace> {
    Ok(open_trace(path)?.into_owned())
}

/// Writes a trace in the form named by `format`, or by the extension of `path`.
pub fn save_trace(trace: &RoutingTrace, path: &Path, format: Option<TraceFormat>) -> Result<()> {
    let format = format
        .or_else(|| TraceFormat::from_extension(path))
        .ok_or_else(|| {
            TraceError::format(
                path,
                "cannot tell the output format: use the extension .mctrace, .parquet or .jsonl",
            )
        })?;
    match format {
        TraceFormat::Binary => binary::write_binary(trace, path),
        TraceFormat::Parquet => parquet::write_parquet(trace, path),
        TraceFormat::Jsonl => write_atomic(path, |w| jsonl::write_jsonl(trace, w)),
    }
}

/// Writes `path` atomically and durably: `body` writes into a temporary file in the same
/// folder, which is flushed, synced to disk (fsync) and renamed over `path` only when
/// `body` succeeded. On error, nothing is left at `path` and the temporary file is
/// removed. The one atomic writer of the workspace (the predictor's and the tiny-MoE
/// trainer's state files go through it too).
pub fn write_atomic<F>(path: &Path, body: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<()>,
{
    let tmp = temp_beside(path)?;
    let file = tmp.reopen().map_err(|e| TraceError::io(path, e))?;
    let mut w = BufWriter::new(file);
    body(&mut w)?;
    w.flush().map_err(|e| TraceError::io(path, e))?;
    w.get_ref()
        .sync_all()
        .map_err(|e| TraceError::io(path, e))?;
    drop(w);
    tmp.persist(path)
        .map_err(|e| TraceError::io(path, e.error))?;
    Ok(())
}

/// A temporary file in the folder of `path` (so it can be renamed onto `path`), removed
/// when dropped unless persisted. It keeps `path`'s extension, for writers that pick
/// the encoding from it.
pub fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let suffix = match path.extension() {
        Some(ext) => format!(".tmp.{}", ext.to_string_lossy()),
        None => ".tmp".to_string(),
    };
    tempfile::Builder::new()
        .prefix(".moecast-")
        .suffix(&suffix)
        .tempfile_in(dir)
        .map_err(|e| TraceError::io(path, e))
}
