//! Trace inputs on the command line: single files, or dataset folders expanded into
//! their memory-mapped shards (converted once, with a progress bar).

use std::path::{Path, PathBuf};

use anyhow::Result;
use datasets::TraceDataset;
use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar over `len` items named `unit` (hidden when stderr is not a terminal).
pub(crate) fn bar(len: usize, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    let template = format!("{{bar:30}} {{pos}}/{{len}} {unit}  [{{elapsed_precise}}]");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// The trace files of `paths`: files as given, each dataset folder replaced by its
/// parts' memory-mapped shards (written when missing or stale).
pub(crate) fn trace_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let bar = bar(0, "parts mapped");
    let files = datasets::dataset::expand_paths(paths, |_, done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    Ok(files)
}

/// The metadata of a trace file or dataset folder.
pub(crate) fn trace_meta(path: &Path) -> Result<datasets::TraceMeta> {
    Ok(if path.is_dir() {
        TraceDataset::open(path)?.meta().clone()
    } else {
        datasets::open_trace(path)?.view().meta.clone()
    })
}
