//! Training examples: the sequence-level split, window coverage, and the rows a batch
//! copies out of a memory-mapped trace.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use datasets::examples::{ExampleSet, RoutingShape, Split, SplitConfig};
use datasets::synth::{synthetic_trace, SynthConfig};
use datasets::{save_trace, TraceFormat};

fn write_synth(dir: &std::path::Path, name: &str, seqs: usize, len: usize, seed: u64) -> PathBuf {
    let t = synthetic_trace(&SynthConfig {
        n_layers: 4,
        n_experts: 8,
        top_k: 2,
        sequences: seqs,
        tokens_per_sequence: len,
        seed,
        ..SynthConfig::default()
    });
    let p = dir.join(name);
    save_trace(&t, &p, Some(TraceFormat::Binary)).unwrap();
    p
}

#[test]
fn split_is_by_sequence_seeded_and_complete() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_synth(dir.path(), "a.mctrace", 12, 20, 1);
    let b = write_synth(dir.path(), "b.mctrace", 8, 20, 2);
    let cfg = SplitConfig {
        validation: 0.2,
        test: 0.1,
        seed: 7,
    };
    let set = ExampleSet::open(&[a.clone(), b.clone()], &cfg).unwrap();
    assert_eq!(set.sequences().len(), 20);
    let count = |s: Split| set.split(s).count();
    assert_eq!(count(Split::Validation), 4);
    assert_eq!(count(Split::Test), 2);
    assert_eq!(count(Split::Train), 14);
    // Same seed, same split; another seed, another split.
    let again = ExampleSet::open(&[a.clone(), b.clone()], &cfg).unwrap();
    assert_eq!(again.sequences(), set.sequences());
    let other = ExampleSet::open(&[a, b], &SplitConfig { seed: 8, ..cfg }).unwrap();
    assert_ne!(other.sequences(), set.sequences());
    // Every token of a sequence lies in its one split.
    let mut owner: HashMap<(usize, usize), Split> = HashMap::new();
    for s in set.sequences() {
        for t in s.tokens.clone() {
            assert!(owner.insert((s.trace, t), s.split).is_none());
        }
    }
    assert_eq!(owner.len(), 20 * 20);
}

#[test]
fn too_few_sequences_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_synth(dir.path(), "a.mctrace", 2, 10, 1);
    let err = ExampleSet::open(&[a], &SplitConfig::default())
        .err()
        .expect("2 sequences cannot give train, validation and test");
    assert!(err.to_string().contains("by sequence"), "{err}");
}

#[test]
fn windows_make_every_token_a_target_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_synth(dir.path(), "a.mctrace", 5, 37, 3);
    let set = ExampleSet::open_for_test(&[a], None).unwrap();
    for len in [4, 7, 16, 64] {
        let windows = set.windows(Split::Test, len);
        let mut seen = HashSet::new();
        for w in &windows {
            assert!(w.len <= len);
            assert!(w.first_target < w.len);
            if w.start > w.seq_start {
                assert!(
                    w.first_target >= len / 2,
                    "mid-sequence targets keep context"
                );
            }
            for t in w.start + w.first_target..w.start + w.len {
                assert!(seen.insert(t), "token {t} is a target twice (len {len})");
            }
        }
        assert_eq!(seen.len(), 5 * 37, "len {len}");
    }
}

#[test]
fn batch_rows_match_the_trace() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_synth(dir.path(), "a.mctrace", 3, 30, 4);
    let set = ExampleSet::open_for_test(std::slice::from_ref(&a), None).unwrap();
    let shape = set.shape();
    assert_eq!(
        shape,
        RoutingShape {
            n_moe: 4,
            n_experts: 8,
            top_k: 2
        }
    );
    let windows = set.windows(Split::Test, 16);
    let batch = set.batch(&windows, 5);
    let view = set.view(0);
    let w = shape.width();
    for (wi, win) in windows.iter().enumerate() {
        for i in 0..batch.len {
            let row = wi * batch.len + i;
            if i >= win.len {
                assert_eq!(batch.token_index[row], usize::MAX);
                assert!(batch.target_mask[row * 4..row * 4 + 4]
                    .iter()
                    .all(|&m| m == 0.0));
                continue;
            }
            let t = win.start + i;
            assert_eq!(batch.token_index[row], t);
            assert_eq!(batch.tokens[row], (view.token[t] % 5) as i64);
            let hot = |v: &[f32]| -> Vec<usize> {
                v.iter()
                    .enumerate()
                    .filter(|(_, &x)| x == 1.0)
                    .map(|(j, _)| j)
                    .collect()
            };
            let expect = |tok: usize| -> Vec<usize> {
                let mut v: Vec<usize> = (0..4)
                    .flat_map(|m| {
                        view.layer(tok, m)
                            .unwrap()
                            .iter()
                            .map(move |&e| m * 8 + e as usize)
                    })
                    .collect();
                v.sort();
                v
            };
            assert_eq!(hot(&batch.routing[row * w..(row + 1) * w]), expect(t));
            let prev = hot(&batch.prev_routing[row * w..(row + 1) * w]);
            if t == win.seq_start {
                assert!(prev.is_empty(), "no previous token at a sequence start");
            } else {
                assert_eq!(prev, expect(t - 1));
            }
            let target = i >= win.first_target;
            assert!(batch.target_mask[row * 4..row * 4 + 4]
                .iter()
                .all(|&m| m == if target { 1.0 } else { 0.0 }));
        }
    }
    // A trace of another shape is refused, naming the file.
    let other = synthetic_trace(&SynthConfig {
        n_layers: 3,
        ..SynthConfig::default()
    });
    let p = dir.path().join("other.mctrace");
    save_trace(&other, &p, Some(TraceFormat::Binary)).unwrap();
    let err = ExampleSet::open_for_test(&[a, p], None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("other.mctrace") && err.contains("does not match"),
        "{err}"
    );
}
