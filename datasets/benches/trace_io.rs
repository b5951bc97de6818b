//! `make bench`: import, conversion, statistics and binary-reader throughput.
//!
//! Uses the real Qwen3-30B-A3B route CSV from `../shared` when present (set
//! `MOECAST_SHARED` to point elsewhere), otherwise a synthetic CSV of the same shape.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use datasets::import::{import, ImportOptions};
use datasets::synth::{synthetic_trace, SynthConfig};
use datasets::{save_trace, stats, MappedTrace, RoutingTrace};

/// Median wall time of `reps` runs of `f`, in seconds.
fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Writes `trace` as a route_trace v1 CSV (decode phase, one row per routed expert).
fn write_route_csv(trace: &RoutingTrace, path: &Path) {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let m = &trace.meta;
    writeln!(w, "# route_trace v1\n# model=synthetic arch=synthetic n_layer={} n_expert={} n_expert_used={}", m.n_layers, m.n_experts, m.top_k).unwrap();
    writeln!(
        w,
        "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes"
    )
    .unwrap();
    let v = trace.view();
    for t in 0..trace.n_tokens() {
        for l in 0..m.n_moe() {
            let ids = v.layer(t, l).unwrap();
            let ws = v.layer_weights(t, l).unwrap();
            for (slot, (e, wt)) in ids.iter().zip(ws).enumerate() {
                writeln!(w, "{},1,{},{l},{slot},{e},{wt:.6},0,0", v.seq[t], v.pos[t]).unwrap();
            }
        }
    }
}

fn shared_qwen() -> Option<PathBuf> {
    let root = std::env::var_os("MOECAST_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let p = root.join("traces/qwen3-30b-a3b_gemma4-26b_gptoss-120b/qwen.route.csv");
    p.exists().then_some(p)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let csv = shared_qwen().unwrap_or_else(|| {
        let t = synthetic_trace(&SynthConfig {
            n_layers: 48,
            n_experts: 128,
            top_k: 6,
            sequences: 2,
            tokens_per_sequence: 78,
            ..Default::default()
        });
        let p = dir.path().join("synthetic.route.csv");
        write_route_csv(&t, &p);
        p
    });
    let csv_bytes = std::fs::metadata(&csv).unwrap().len();
    let rows = std::fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count()
        - 1;
    println!(
        "input: {} ({:.2} MB, {rows} rows)",
        csv.display(),
        csv_bytes as f64 / 1e6
    );

    let opts = ImportOptions::default();
    let files = [csv.clone()];
    let t_import = time(7, || import(&files, None, &opts).unwrap());
    let trace = import(&files, None, &opts).unwrap().trace;
    println!(
        "import route CSV        {:>8.1} ms   {:>6.2} M records/s",
        t_import * 1e3,
        rows as f64 / t_import / 1e6
    );
    let pq = dir.path().join("t.parquet");
    let bin = dir.path().join("t.mctrace");
    let t_pq = time(7, || save_trace(&trace, &pq, None).unwrap());
    println!("write Parquet           {:>8.1} ms", t_pq * 1e3);
    let t_pq_read = time(7, || datasets::load_trace(&pq).unwrap());
    println!("read Parquet            {:>8.1} ms", t_pq_read * 1e3);
    let t_bin = time(7, || save_trace(&trace, &bin, None).unwrap());
    println!("write binary            {:>8.1} ms", t_bin * 1e3);
    let t_open = time(7, || MappedTrace::open(&bin).unwrap());
    println!("open binary (mmap+check){:>8.3} ms", t_open * 1e3);
    let caps = stats::default_lru_capacities(trace.meta.n_experts, trace.meta.top_k);
    let t_stats = time(7, || stats::compute(&trace.view(), &caps));
    println!("trace stats             {:>8.1} ms", t_stats * 1e3);
    println!(
        "end-to-end import+binary+stats {:>6.1} ms",
        (t_import + t_bin + t_stats) * 1e3
    );

    // Binary reader throughput on a large trace (about 150 MB of routing).
    let big = synthetic_trace(&SynthConfig {
        n_layers: 48,
        n_experts: 128,
        top_k: 8,
        sequences: 100,
        tokens_per_sequence: 2000,
        ..Default::default()
    });
    let big_path = dir.path().join("big.mctrace");
    save_trace(&big, &big_path, None).unwrap();
    drop(big);
    let mapped = MappedTrace::open(&big_path).unwrap();
    let v = mapped.view();
    let n_moe = v.meta.n_moe();
    let bytes = (v.experts.len() * 2) as f64;
    let t_scan = time(5, || {
        let mut sum = 0u64;
        for t in 0..v.n_tokens() {
            for m in 0..n_moe {
                if let Some(ids) = v.layer(t, m) {
                    sum += ids.iter().map(|&e| e as u64).sum::<u64>();
                }
            }
        }
        sum
    });
    println!(
        "binary reader, sequential per-token layer slices: {:.2} GB/s over {:.0} MB",
        bytes / t_scan / 1e9,
        bytes / 1e6
    );
    let mut x = 0x9E3779B97F4A7C15u64;
    let lookups = 1_000_000;
    let t_rand = time(5, || {
        let mut sum = 0u64;
        for _ in 0..lookups {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = (x % v.n_tokens() as u64) as usize;
            sum += v
                .layer(t, (x >> 32) as usize % n_moe)
                .map_or(0, |ids| ids[0] as u64);
        }
        sum
    });
    println!(
        "binary reader, random token lookups: {:.1} M/s",
        lookups as f64 / t_rand / 1e6
    );
}
