//! Hive-partitioned Parquet datasets: parts bounded and made of whole sequences, the
//! union equal to the imported traces, statistics streamed part by part equal to the
//! whole trace's, appends, and failures that leave the dataset untouched.

use std::path::{Path, PathBuf};

use datasets::dataset::{partition_value, DatasetWriter, TraceDataset};
use datasets::examples::{ExampleSet, Split};
use datasets::import::{import_to_dataset, ImportFormat, ImportOptions};
use datasets::synth::{synthetic_trace, SynthConfig};
use datasets::{load_trace, stats, RoutingTrace};

fn trace(seed: u64, sequences: usize, model: &str) -> RoutingTrace {
    let mut t = synthetic_trace(&SynthConfig {
        n_layers: 4,
        n_experts: 16,
        top_k: 2,
        sequences,
        tokens_per_sequence: 30 + seed as usize,
        stickiness: 0.4,
        zipf: 0.8,
        seed,
    });
    t.meta.model = model.into();
    t
}

fn write_jsonl(dir: &Path, name: &str, t: &RoutingTrace) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    datasets::jsonl::write_jsonl(t, &mut f).unwrap();
    path
}

fn import(files: &[PathBuf], root: &Path, part_rows: usize) -> datasets::Result<Vec<PathBuf>> {
    let mut w = DatasetWriter::create(root, part_rows)?;
    import_to_dataset(
        files,
        Some(ImportFormat::Jsonl),
        &ImportOptions::default(),
        &mut w,
        |_, _| {},
    )?;
    w.finish()
}

/// Every token of `parts` as (sequence, position, experts), in order.
fn tokens_of(parts: &[PathBuf]) -> Vec<(String, u32, Vec<u16>)> {
    let mut out = Vec::new();
    for p in parts {
        let t = load_trace(p).unwrap();
        let slots = t.meta.slots_per_token();
        for i in 0..t.n_tokens() {
            out.push((
                t.seq_names[t.seq[i] as usize].clone(),
                t.pos[i],
                t.experts[i * slots..(i + 1) * slots].to_vec(),
            ));
        }
    }
    out
}

#[test]
fn parts_hold_whole_sequences_and_the_union_is_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (trace(1, 9, "org/model-a"), trace(2, 5, "org/model-a"));
    let files = [
        write_jsonl(dir.path(), "a.jsonl", &a),
        write_jsonl(dir.path(), "b.jsonl", &b),
    ];
    let root = dir.path().join("ds");
    // 31 tokens x 4 layers = 124 rows per sequence of `a`: 3 sequences per part.
    let parts = import(&files, &root, 400).unwrap();
    let partition = root
        .join(format!("model={}", partition_value("org/model-a")))
        .join("source=moecast%20synth");
    assert!(partition.ends_with("model=org%2Fmodel-a/source=moecast%20synth"));
    assert!(parts.len() >= 5, "{parts:?}");
    let mut seen = std::collections::HashSet::new();
    for p in &parts {
        assert_eq!(p.parent().unwrap(), partition);
        let t = load_trace(p).unwrap();
        let rows = t.n_tokens() * t.meta.n_moe();
        assert!(rows <= 400, "{}: {rows} rows", p.display());
        for name in &t.seq_names {
            assert!(
                seen.insert(name.clone()),
                "sequence {name} split across parts"
            );
        }
    }
    // Sequence names clash between a and b (both synthetic): b's get its file stem.
    let mut expected = tokens_of(&[files[0].clone()]);
    for (name, pos, ids) in tokens_of(&[files[1].clone()]) {
        expected.push((format!("b:{name}"), pos, ids));
    }
    assert_eq!(tokens_of(&parts), expected);
    let ds = TraceDataset::open(&root).unwrap();
    assert_eq!(ds.parts(), &parts[..]);
    assert_eq!(
        ds.rows().iter().sum::<usize>(),
        (a.n_tokens() + b.n_tokens()) * 4
    );
    assert!(!std::fs::read_dir(&root).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".moecast-staging")));
}

#[test]
fn streamed_statistics_equal_the_whole_trace() {
    let dir = tempfile::tempdir().unwrap();
    let t = trace(3, 20, "m");
    let file = write_jsonl(dir.path(), "t.jsonl", &t);
    let root = dir.path().join("ds");
    let parts = import(std::slice::from_ref(&file), &root, 300).unwrap();
    assert!(parts.len() > 3);
    let caps = [2, 4, 9];
    let ds = TraceDataset::open(&root).unwrap();
    let mut calls = 0;
    let streamed = ds.stats(&caps, |_, _| calls += 1).unwrap();
    assert_eq!(calls, 2 * parts.len(), "two passes over every part");
    let whole = stats::compute(&load_trace(&file).unwrap().view(), &caps);
    assert_eq!(
        serde_json::to_value(&streamed).unwrap(),
        serde_json::to_value(&whole).unwrap()
    );
    assert_eq!(streamed.lru_curve, whole.lru_curve);
    // The shards are memory-mapped copies of the parts; training sees every sequence.
    for (i, p) in parts.iter().enumerate() {
        let shard = ds.shard(i).unwrap();
        assert!(shard.starts_with(p.parent().unwrap().join(".moecast-shards")));
        assert_eq!(load_trace(&shard).unwrap(), load_trace(p).unwrap());
    }
    let set = ExampleSet::open_for_test(std::slice::from_ref(&root), None).unwrap();
    assert_eq!(set.split_tokens(Split::Test), t.n_tokens());
    assert_eq!(set.paths().len(), parts.len());
}

#[test]
fn stale_shards_are_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ds");
    let f1 = write_jsonl(dir.path(), "one.jsonl", &trace(4, 3, "m"));
    let parts = import(&[f1], &root, 10_000).unwrap();
    let ds = TraceDataset::open(&root).unwrap();
    let shard = ds.shard(0).unwrap();
    // Replace the part with another trace, newer than the shard (its time set past
    // the shard's, whatever the file system's timestamp resolution).
    let other = trace(5, 2, "m");
    datasets::save_trace(&other, &parts[0], None).unwrap();
    let later =
        std::fs::metadata(&shard).unwrap().modified().unwrap() + std::time::Duration::from_secs(10);
    std::fs::File::options()
        .write(true)
        .open(&parts[0])
        .unwrap()
        .set_modified(later)
        .unwrap();
    let again = TraceDataset::open(&root).unwrap().shard(0).unwrap();
    assert_eq!(again, shard);
    assert_eq!(load_trace(&again).unwrap().n_tokens(), other.n_tokens());
}

#[test]
fn appends_number_after_existing_parts_and_models_get_their_own_partition() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ds");
    let f1 = write_jsonl(dir.path(), "one.jsonl", &trace(6, 4, "m"));
    let f2 = write_jsonl(dir.path(), "two.jsonl", &trace(7, 4, "m"));
    let first = import(&[f1], &root, 10_000).unwrap();
    let second = import(&[f2], &root, 10_000).unwrap();
    assert!(first[0].ends_with("part-00000.parquet"));
    assert!(second[0].ends_with("part-00001.parquet"));
    assert_eq!(TraceDataset::open(&root).unwrap().parts().len(), 2);

    let f3 = write_jsonl(dir.path(), "three.jsonl", &trace(8, 2, "other"));
    import(&[f3], &root, 10_000).unwrap();
    let err = TraceDataset::open(&root).unwrap_err().to_string();
    assert!(err.contains("open one model=... folder"), "{err}");
    assert_eq!(
        TraceDataset::open(&root.join("model=other"))
            .unwrap()
            .meta()
            .model,
        "other"
    );
}

#[test]
fn a_failed_import_leaves_the_dataset_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ds");
    let good = write_jsonl(dir.path(), "good.jsonl", &trace(9, 6, "m"));
    // Same model name, another shape: refused naming the input file.
    let mut wide = synthetic_trace(&SynthConfig {
        n_layers: 4,
        n_experts: 32,
        top_k: 2,
        sequences: 2,
        tokens_per_sequence: 10,
        ..SynthConfig::default()
    });
    wide.meta.model = "m".into();
    wide.meta.source = Some("moecast synth".into());
    let wide = write_jsonl(dir.path(), "wide.jsonl", &wide);
    let err = import(&[good.clone(), wide], &root, 50)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wide.jsonl") && err.contains("model shape differs"),
        "{err}"
    );
    assert!(
        !root.exists(),
        "the folder this import made is removed again"
    );

    // A truncated input into an existing folder: the error names it, the folder stays
    // and nothing is written into it.
    std::fs::create_dir(&root).unwrap();
    let bad = dir.path().join("bad.jsonl");
    let text = std::fs::read_to_string(&good).unwrap();
    std::fs::write(&bad, &text[..text.len() / 2]).unwrap();
    let err = import(&[good, bad], &root, 50).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl"), "{err}");
    assert!(std::fs::read_dir(&root).unwrap().next().is_none());
    assert!(TraceDataset::open(&root).is_err());
}

#[test]
fn binary_and_parquet_traces_join_a_dataset_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let t = trace(11, 6, "m");
    let (bin, pq) = (dir.path().join("t.mctrace"), dir.path().join("u.parquet"));
    datasets::save_trace(&t, &bin, None).unwrap();
    let mut u = trace(12, 3, "m");
    u.seq_names = u.seq_names.iter().map(|n| format!("u-{n}")).collect();
    datasets::save_trace(&u, &pq, None).unwrap();
    let root = dir.path().join("ds");
    let mut w = DatasetWriter::create(&root, 100_000).unwrap();
    // Detected from their first bytes, like every other format.
    import_to_dataset(
        &[bin.clone(), pq.clone()],
        None,
        &ImportOptions::default(),
        &mut w,
        |_, _| {},
    )
    .unwrap();
    let parts = w.finish().unwrap();
    assert_eq!(parts.len(), 1);
    let back = load_trace(&parts[0]).unwrap();
    assert_eq!(back.n_tokens(), t.n_tokens() + u.n_tokens());
    assert_eq!(
        tokens_of(&parts),
        [tokens_of(&[bin]), tokens_of(&[pq])].concat()
    );
}
