//! Traces at scale: a hive-partitioned Parquet dataset.
//!
//! ```text
//! DIR/model=Qwen%2FQwen3-30B-A3B/source=vllm/part-00000.parquet
//!                                            part-00001.parquet
//!                                            .moecast-shards/part-00000.mctrace  (cache)
//! ```
//!
//! Every part is a complete Parquet trace (the schema of [`crate::parquet`], its
//! [`TraceMeta`] in the footer) holding whole sequences, at most about `part_rows`
//! (token, MoE layer) rows, so DuckDB, Spark or polars read the dataset as one table with
//! `model` and `source` columns from the folder names (Hive convention: values
//! percent-encoded). moecast reads a dataset part by part: each part is converted once
//! into a memory-mapped `.mctrace` shard in a hidden folder beside it (ignored by those
//! tools), and statistics, training and simulation walk the shards without holding the
//! dataset in memory.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{Result, TraceError};
use crate::import::concat;
use crate::parquet::{read_parquet, read_parquet_meta, write_parquet};
use crate::stats::{StatsBuilder, TraceStats};
use crate::trace::{RoutingTrace, TraceMeta};
use crate::{binary, MappedTrace};

/// Default bound on the rows (token x MoE layer) of one part.
pub const DEFAULT_PART_ROWS: usize = 1_000_000;
/// Folder, beside the parts, of their memory-mapped shards.
pub const SHARD_DIR: &str = ".moecast-shards";

/// A Hive partition value: bytes outside `[A-Za-z0-9._-]` percent-encoded.
pub fn partition_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        "unknown".into()
    } else {
        out
    }
}

/// Writes traces into a dataset, a part at a time, each into the partition of its
/// model and source. Parts are staged in a hidden folder of the dataset root and moved
/// into their partitions by [`DatasetWriter::finish`]; a writer dropped without it (an
/// error, Ctrl-C) leaves the dataset as it was.
pub struct DatasetWriter {
    root: PathBuf,
    /// Whether `create` made the root folder (removed again if nothing lands in it).
    created_root: bool,
    part_rows: usize,
    staging: tempfile::TempDir,
    partitions: Vec<Partition>,
    /// Tokens written so far.
    pub tokens: usize,
    /// Sequences written so far.
    pub sequences: usize,
}

/// One `model=/source=` folder being written.
struct Partition {
    rel: PathBuf,
    meta: TraceMeta,
    names: HashSet<String>,
    pending: Vec<(PathBuf, RoutingTrace)>,
    pending_rows: usize,
    next_part: usize,
    /// (staged file, final file name)
    staged: Vec<(PathBuf, String)>,
}

impl DatasetWriter {
    /// Starts writing into the dataset at `root` (created if missing). `part_rows`
    /// bounds the rows of a part (a longer sequence gets a part of its own).
    pub fn create(root: &Path, part_rows: usize) -> Result<Self> {
        if part_rows == 0 {
            return Err(TraceError::Invalid("part rows must be at least 1".into()));
        }
        if root.is_file() {
            return Err(TraceError::format(
                root,
                "is a file; a dataset output is a folder (end the path with '/')",
            ));
        }
        let created_root = !root.exists();
        std::fs::create_dir_all(root).map_err(|e| TraceError::io(root, e))?;
        let staging = tempfile::Builder::new()
            .prefix(".moecast-staging-")
            .tempdir_in(root)
            .map_err(|e| TraceError::io(root, e))?;
        Ok(DatasetWriter {
            root: root.to_path_buf(),
            created_root,
            part_rows,
            staging,
            partitions: Vec::new(),
            tokens: 0,
            sequences: 0,
        })
    }

    /// The partition folders written to (relative to the root).
    pub fn partitions(&self) -> Vec<&Path> {
        self.partitions.iter().map(|p| p.rel.as_path()).collect()
    }

    /// Adds the sequences of `trace` (read from `origin`, named in errors) to the
    /// partition of its model and source, whose parts (earlier ones included) must all
    /// have the same model shape.
    pub fn push(&mut self, mut trace: RoutingTrace, origin: &Path) -> Result<()> {
        let rel =
            PathBuf::from(format!("model={}", partition_value(&trace.meta.model))).join(format!(
                "source={}",
                partition_value(trace.meta.source.as_deref().unwrap_or("unknown"))
            ));
        let idx = match self.partitions.iter().position(|p| p.rel == rel) {
            Some(i) => i,
            None => {
                self.partitions
                    .push(Partition::open(&self.root, rel, &trace.meta)?);
                self.partitions.len() - 1
            }
        };
        let part = &mut self.partitions[idx];
        if !part.meta.same_shape(&trace.meta) {
            let m = &part.meta;
            return Err(TraceError::format(
                origin,
                format!(
                    "model shape differs from the partition's {} (MoE layers {:?}, E {}, k {} vs {:?}, E {}, k {}); import with --model NAME",
                    part.rel.display(),
                    trace.meta.moe_layers, trace.meta.n_experts, trace.meta.top_k,
                    m.moe_layers, m.n_experts, m.top_k
                ),
            ));
        }
        for name in trace.seq_names.iter_mut() {
            if !part.names.insert(name.clone()) {
                *name = format!("{}:{name}", crate::import::stem(origin));
                part.names.insert(name.clone());
            }
        }
        self.tokens += trace.n_tokens();
        self.sequences += trace.seq_names.len();
        // Cut before a sequence that would take the open part past `part_rows`.
        let n_moe = trace.meta.n_moe();
        let mut cuts = Vec::new();
        let mut rows = part.pending_rows;
        for r in trace.view().sequence_ranges() {
            let seq_rows = r.len() * n_moe;
            if rows + seq_rows > self.part_rows && rows > 0 {
                cuts.push(r.start);
                rows = 0;
            }
            rows += seq_rows;
        }
        let n = trace.n_tokens();
        let mut start = 0;
        for &cut in &cuts {
            if cut > start {
                let chunk = trace.view().tokens(start..cut).to_owned_trace();
                part.pending.push((origin.to_path_buf(), chunk));
            }
            part.flush(self.staging.path(), idx)?;
            start = cut;
        }
        if n > start {
            let rest = if start == 0 {
                trace
            } else {
                trace.view().tokens(start..n).to_owned_trace()
            };
            part.pending.push((origin.to_path_buf(), rest));
        }
        part.pending_rows = rows;
        Ok(())
    }

    /// Writes the last parts and moves the staged parts into their partitions;
    /// returns their final paths.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        if self.partitions.is_empty() {
            return Err(TraceError::Invalid("no trace was imported".into()));
        }
        let mut out = Vec::new();
        for (idx, part) in self.partitions.iter_mut().enumerate() {
            part.flush(self.staging.path(), idx)?;
            let dir = self.root.join(&part.rel);
            std::fs::create_dir_all(&dir).map_err(|e| TraceError::io(&dir, e))?;
            for (staged, name) in &part.staged {
                let dest = dir.join(name);
                std::fs::rename(staged, &dest).map_err(|e| TraceError::io(&dest, e))?;
                out.push(dest);
            }
        }
        Ok(out)
    }
}

impl Drop for DatasetWriter {
    /// Removes the staging folder, and the root when this writer made it and it stayed
    /// empty (a failed first import leaves nothing behind).
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.staging.path());
        if self.created_root {
            let _ = std::fs::remove_dir(&self.root);
        }
    }
}

impl Partition {
    /// A partition to write, numbering new parts after those already in its folder
    /// (which must have `meta`'s shape).
    fn open(root: &Path, rel: PathBuf, meta: &TraceMeta) -> Result<Partition> {
        let dir = root.join(&rel);
        let mut next_part = 0;
        if dir.is_dir() {
            for existing in collect_parts(&dir)? {
                let (m, _) = read_parquet_meta(&existing)?;
                if !m.same_shape(meta) {
                    return Err(TraceError::format(
                        &existing,
                        "this partition holds another model shape; import with --model NAME",
                    ));
                }
                if let Some(n) = part_number(&existing) {
                    next_part = next_part.max(n + 1);
                }
            }
        }
        Ok(Partition {
            rel,
            meta: meta.clone(),
            names: HashSet::new(),
            pending: Vec::new(),
            pending_rows: 0,
            next_part,
            staged: Vec::new(),
        })
    }

    fn flush(&mut self, staging: &Path, idx: usize) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let trace = concat(std::mem::take(&mut self.pending))?;
        self.pending_rows = 0;
        let name = format!("part-{:05}.parquet", self.next_part);
        self.next_part += 1;
        let path = staging.join(format!("{idx}-{name}"));
        write_parquet(&trace, &path)?;
        self.staged.push((path, name));
        Ok(())
    }
}

fn part_number(path: &Path) -> Option<usize> {
    path.file_stem()?
        .to_str()?
        .strip_prefix("part-")?
        .parse()
        .ok()
}

/// A dataset opened for reading: its parts (every `.parquet` file below the root,
/// hidden and `_` folders skipped, in path order) and their shared shape.
#[derive(Debug, Clone)]
pub struct TraceDataset {
    root: PathBuf,
    parts: Vec<PathBuf>,
    rows: Vec<usize>,
    meta: TraceMeta,
}

impl TraceDataset {
    /// Opens the dataset at `root`, reading only the parts' footers. All parts must
    /// share one model shape: a root holding several models is refused with the
    /// partition to point at instead.
    pub fn open(root: &Path) -> Result<TraceDataset> {
        let parts = collect_parts(root)?;
        if parts.is_empty() {
            return Err(TraceError::format(root, "no .parquet parts in this folder"));
        }
        let mut meta: Option<TraceMeta> = None;
        let mut rows = Vec::with_capacity(parts.len());
        for p in &parts {
            let (m, n) = read_parquet_meta(p)?;
            match &mut meta {
                None => meta = Some(m),
                Some(first) if first.model != m.model || !first.same_shape(&m) => {
                    return Err(TraceError::format(
                        p,
                        format!(
                            "holds model '{}', other parts hold '{}' (or another shape): open one model=... folder",
                            m.model, first.model
                        ),
                    ))
                }
                Some(first) => first.ranked &= m.ranked,
            }
            rows.push(n);
        }
        Ok(TraceDataset {
            root: root.to_path_buf(),
            parts,
            rows,
            meta: meta.expect("at least one part"),
        })
    }

    /// The dataset folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The Parquet parts, in order.
    pub fn parts(&self) -> &[PathBuf] {
        &self.parts
    }

    /// Rows (token x MoE layer) of each part, from the footers.
    pub fn rows(&self) -> &[usize] {
        &self.rows
    }

    /// The first part's metadata (`ranked` only if every part is).
    pub fn meta(&self) -> &TraceMeta {
        &self.meta
    }

    /// The memory-mapped shard of part `i`, written from the Parquet part when it is
    /// missing or older than the part (in `.moecast-shards/` beside it, or in the
    /// system's temporary folder when the dataset is read-only).
    pub fn shard(&self, i: usize) -> Result<PathBuf> {
        let part = &self.parts[i];
        let stem = part.file_stem().unwrap_or_default().to_string_lossy();
        let beside = part
            .parent()
            .unwrap_or(Path::new("."))
            .join(SHARD_DIR)
            .join(format!("{stem}.mctrace"));
        if is_fresh(&beside, part) {
            return Ok(beside);
        }
        let abs = std::fs::canonicalize(part).map_err(|e| TraceError::io(part, e))?;
        let key = abs
            .to_string_lossy()
            .bytes()
            .fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100000001b3)
            });
        let elsewhere = std::env::temp_dir()
            .join("moecast-shards")
            .join(format!("{key:016x}-{stem}.mctrace"));
        if is_fresh(&elsewhere, part) {
            return Ok(elsewhere);
        }
        let trace = read_parquet(part)?;
        let dir = beside.parent().unwrap_or(Path::new("."));
        if std::fs::create_dir_all(dir).is_ok() && binary::write_binary(&trace, &beside).is_ok() {
            return Ok(beside);
        }
        let dir = elsewhere.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| TraceError::io(dir, e))?;
        binary::write_binary(&trace, &elsewhere)?;
        Ok(elsewhere)
    }

    /// Every part's shard, converting those that are missing; `progress(done, total)`
    /// is called after each.
    pub fn shards(&self, mut progress: impl FnMut(usize, usize)) -> Result<Vec<PathBuf>> {
        let mut out = Vec::with_capacity(self.parts.len());
        for i in 0..self.parts.len() {
            out.push(self.shard(i)?);
            progress(i + 1, self.parts.len());
        }
        Ok(out)
    }

    /// Statistics of the whole dataset (see [`crate::stats`]), computed one memory-mapped
    /// shard at a time: two passes, the second for the co-activation recall.
    /// `progress(done, total)` counts shard visits over both passes.
    pub fn stats(
        &self,
        lru_capacities: &[u32],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<TraceStats> {
        let mut builder = StatsBuilder::new(&self.meta, lru_capacities);
        let passes = if builder.needs_second_pass() { 2 } else { 1 };
        let total = passes * self.parts.len();
        for i in 0..self.parts.len() {
            let mapped = MappedTrace::open(&self.shard(i)?)?;
            builder.add(&mapped.view());
            progress(i + 1, total);
        }
        if passes == 2 {
            for i in 0..self.parts.len() {
                let mapped = MappedTrace::open(&self.shard(i)?)?;
                builder.add_recall(&mapped.view());
                progress(self.parts.len() + i + 1, total);
            }
        }
        Ok(builder.finish())
    }
}

/// `paths` with every dataset folder replaced by its parts' shards (see
/// [`TraceDataset::shard`]); files stay as they are. `progress(folder, done, total)` is
/// called after each shard of a folder.
pub fn expand_paths(
    paths: &[PathBuf],
    mut progress: impl FnMut(&Path, usize, usize),
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            out.extend(TraceDataset::open(p)?.shards(|done, total| progress(p, done, total))?);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn is_fresh(shard: &Path, part: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    matches!((modified(shard), modified(part)), (Some(s), Some(p)) if s >= p)
}

/// Every `.parquet` file below `dir`, skipping hidden and `_` folders, sorted by path.
fn collect_parts(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| TraceError::io(&d, e))? {
            let path = entry.map_err(|e| TraceError::io(&d, e))?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "parquet") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
