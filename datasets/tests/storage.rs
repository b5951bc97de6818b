//! Lossless round trips through every storage form, and corrupt-file handling.

use datasets::synth::{synthetic_trace, SynthConfig};
use datasets::{
    load_trace, save_trace, MappedTrace, Phase, RoutingTrace, TokenRecord, TraceBuilder, TraceMeta,
};

/// Equality that treats NaN weights (unknown) as equal.
fn assert_same(a: &RoutingTrace, b: &RoutingTrace) {
    assert_eq!(a.meta, b.meta);
    assert_eq!(a.seq_names, b.seq_names);
    assert_eq!(
        (&a.seq, &a.pos, &a.token, &a.phase),
        (&b.seq, &b.pos, &b.token, &b.phase)
    );
    assert_eq!(a.experts, b.experts);
    match (&a.weights, &b.weights) {
        (None, None) => {}
        (Some(x), Some(y)) => {
            assert_eq!(x.len(), y.len());
            for (p, q) in x.iter().zip(y) {
                assert!(
                    p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
                    "{p} vs {q}"
                );
            }
        }
        _ => panic!("weights present on one side only"),
    }
}

/// A trace with every special case: missing layers, unknown tokens, missing weights.
fn awkward_trace() -> RoutingTrace {
    let meta = TraceMeta {
        channels: Vec::new(),
        model: "awkward".into(),
        architecture: Some("mixtral".into()),
        n_layers: 5,
        moe_layers: vec![1, 2, 4],
        n_experts: 300,
        top_k: 3,
        n_shared_experts: 1,
        source: Some("test".into()),
        tokenizer: Some("bpe".into()),
        ranked: true,
        expert_bytes: Some(vec![10, 20, 30]),
    };
    let mut b = TraceBuilder::new(meta, true).unwrap();
    let recs = [
        (
            "s1",
            0,
            Phase::Prefill,
            Some(5),
            [Some(vec![0, 299, 7]), None, Some(vec![1, 2, 3])],
            true,
        ),
        (
            "s1",
            1,
            Phase::Decode,
            None,
            [Some(vec![7, 0, 1]), Some(vec![4, 5, 6]), None],
            false,
        ),
        ("s2", 10, Phase::Decode, Some(0), [None, None, None], false),
    ];
    for (seq, pos, phase, token, experts, with_w) in recs {
        let weights = experts
            .iter()
            .map(|e| {
                e.as_ref()
                    .filter(|_| with_w)
                    .map(|_| vec![0.5f32, 0.3, 0.2])
            })
            .collect();
        b.push(&TokenRecord {
            channels: Default::default(),
            seq: seq.into(),
            pos,
            phase,
            token,
            experts: experts.to_vec(),
            weights: Some(weights),
        })
        .unwrap();
    }
    b.finish().unwrap()
}

fn round_trip(trace: &RoutingTrace, ext: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(format!("t.{ext}"));
    save_trace(trace, &p, None).unwrap();
    let back = load_trace(&p).unwrap();
    assert_same(trace, &back);
}

#[test]
fn every_form_round_trips_losslessly() {
    let synth = synthetic_trace(&SynthConfig {
        sequences: 3,
        tokens_per_sequence: 40,
        ..Default::default()
    });
    for trace in [synth, awkward_trace()] {
        for ext in ["mctrace", "parquet", "jsonl"] {
            round_trip(&trace, ext);
        }
    }
}

#[test]
fn binary_form_gives_zero_copy_token_access() {
    let trace = synthetic_trace(&SynthConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.mctrace");
    save_trace(&trace, &p, None).unwrap();
    let mapped = MappedTrace::open(&p).unwrap();
    let v = mapped.view();
    let base = mapped_range(&mapped);
    for t in [0, 77, trace.n_tokens() - 1] {
        let ids = v.layer(t, 3).unwrap();
        assert_eq!(ids, trace.view().layer(t, 3).unwrap());
        let addr = ids.as_ptr() as usize;
        assert!(base.contains(&addr), "layer slice must point into the map");
        assert_eq!(addr % 2, 0);
    }
    for s in mapped.sections() {
        assert_eq!(s.offset % 64, 0, "section {} aligned", s.name);
    }
}

fn mapped_range(m: &MappedTrace) -> std::ops::Range<usize> {
    let v = m.view();
    let start = v.seq.as_ptr() as usize - m.sections()[0].offset as usize;
    start..start + m.file_len()
}

#[test]
fn corrupt_binary_files_are_rejected_with_the_file_name() {
    let trace = synthetic_trace(&SynthConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.mctrace");
    save_trace(&trace, &p, None).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let cut = dir.path().join("cut.mctrace");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = MappedTrace::open(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.mctrace") && e.contains("truncated"), "{e}");
    std::fs::write(&cut, &bytes[..12]).unwrap();
    assert!(MappedTrace::open(&cut)
        .unwrap_err()
        .to_string()
        .contains("bad magic"));
    // An out-of-range expert id inside the experts section.
    let mut bad = bytes.clone();
    let m = MappedTrace::open(&p).unwrap();
    let off = m
        .sections()
        .iter()
        .find(|s| s.name == "experts")
        .unwrap()
        .offset as usize;
    bad[off..off + 2].copy_from_slice(&500u16.to_le_bytes());
    std::fs::write(&cut, &bad).unwrap();
    let e = MappedTrace::open(&cut).unwrap_err().to_string();
    assert!(e.contains("expert id 500"), "{e}");
}

#[test]
fn a_failed_write_leaves_no_file() {
    let trace = awkward_trace();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("no-format.bin");
    assert!(save_trace(&trace, &p, None).is_err());
    assert!(!p.exists());
    let missing_dir = dir.path().join("nope/t.mctrace");
    assert!(save_trace(&trace, &missing_dir, None).is_err());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no temp files left"
    );
}

#[test]
fn parquet_keeps_the_documented_schema() {
    use polars::prelude::*;
    let trace = awkward_trace();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.parquet");
    save_trace(&trace, &p, None).unwrap();
    let df = ParquetReader::new(std::fs::File::open(&p).unwrap())
        .finish()
        .unwrap();
    assert_eq!(df.height(), 3 * 3, "one row per (token, MoE layer)");
    let names: Vec<&str> = df.get_column_names().iter().map(|s| s.as_str()).collect();
    assert_eq!(
        names,
        ["seq", "pos", "phase", "token", "layer", "experts", "weights"]
    );
    assert_eq!(
        df.column("experts").unwrap().dtype(),
        &DataType::List(Box::new(DataType::UInt16))
    );
    assert_eq!(df.column("experts").unwrap().null_count(), 5);
    assert_eq!(df.column("token").unwrap().null_count(), 3);
}
