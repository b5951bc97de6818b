//! `make bench`: a partitioned dataset at scale. Writes vLLM completion responses
//! (`choices[0].routed_experts` = base64 `.npy`, Qwen3-30B-A3B's shape: 48 MoE layers,
//! 128 experts, top-8) holding N (token, layer) records, then in a fresh process each
//! imports them into a hive-partitioned Parquet dataset and computes the dataset's
//! statistics, and prints records/s and the process's peak RSS. Run at 1 M and 10 M
//! records (`MOECAST_BENCH_RECORDS` overrides the larger), peak RSS should not grow
//! with the record count; the last column is the peak RSS of importing the same
//! responses into one in-memory trace (`-o FILE.mctrace`), for comparison.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use base64::Engine;
use datasets::import::{import_to_dataset, ImportFormat, ImportOptions};
use datasets::synth::{synthetic_trace, SynthConfig};
use datasets::{DatasetWriter, TraceDataset};
use npyz::WriterBuilder;

const LAYERS: u32 = 48;
const EXPERTS: u32 = 128;
const TOP_K: u32 = 8;
const PROMPT: usize = 256;
const GENERATED: usize = 257;

/// Peak resident set of this process (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Writes `n` responses of `PROMPT + GENERATED - 1` routed tokens each.
fn write_responses(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let rows = PROMPT + GENERATED - 1;
    for i in 0..n {
        let t = synthetic_trace(&SynthConfig {
            n_layers: LAYERS,
            n_experts: EXPERTS,
            top_k: TOP_K,
            sequences: 1,
            tokens_per_sequence: rows,
            stickiness: 0.3,
            zipf: 0.8,
            seed: i as u64,
        });
        let ids: Vec<u8> = t.experts.iter().map(|&e| e as u8).collect();
        let mut npy = Vec::new();
        {
            let mut w = npyz::WriteOptions::new()
                .default_dtype()
                .shape(&[rows as u64, LAYERS as u64, TOP_K as u64])
                .writer(&mut npy)
                .begin_nd()
                .unwrap();
            w.extend(ids).unwrap();
            w.finish().unwrap();
        }
        let prompt: Vec<u32> = (0..PROMPT as u32)
            .map(|p| (p * 7 + i as u32) % 32000)
            .collect();
        let generated: Vec<u32> = (0..GENERATED as u32)
            .map(|p| (p * 13 + i as u32) % 32000)
            .collect();
        let response = serde_json::json!({
            "id": format!("cmpl-{i}"), "object": "text_completion", "model": "Qwen/Qwen3-30B-A3B",
            "prompt_token_ids": prompt,
            "choices": [{"index": 0, "text": "", "finish_reason": "length",
                         "token_ids": generated,
                         "routed_experts": base64::engine::general_purpose::STANDARD.encode(&npy)}],
        });
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(dir.join(format!("resp-{i:06}.json"))).unwrap(),
        );
        serde_json::to_writer(&mut f, &response).unwrap();
        f.flush().unwrap();
    }
}

/// Runs in the child process: one phase, then prints `seconds peak_rss_mib`.
fn child(phase: &str, input: &Path, dataset: &Path) {
    let start = Instant::now();
    match phase {
        "import" => {
            let mut w =
                DatasetWriter::create(dataset, datasets::dataset::DEFAULT_PART_ROWS).unwrap();
            let opts = ImportOptions::default();
            import_to_dataset(
                &[input.to_path_buf()],
                Some(ImportFormat::Vllm),
                &opts,
                &mut w,
                |_, _| {},
            )
            .unwrap();
            w.finish().unwrap();
        }
        "stats" => {
            let ds = TraceDataset::open(dataset).unwrap();
            let caps = datasets::stats::default_lru_capacities(EXPERTS, TOP_K);
            let s = ds.stats(&caps, |_, _| {}).unwrap();
            assert_eq!(s.moe_layers, LAYERS as usize);
        }
        "single" => {
            let opts = ImportOptions::default();
            let t =
                datasets::import::import(&[input.to_path_buf()], Some(ImportFormat::Vllm), &opts)
                    .unwrap();
            datasets::save_trace(&t.trace, &dataset.join("all.mctrace"), None).unwrap();
        }
        _ => panic!("unknown phase {phase}"),
    }
    println!("{} {}", start.elapsed().as_secs_f64(), peak_rss_mib());
}

fn run_child(phase: &str, input: &Path, dataset: &Path) -> (f64, f64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("MOECAST_SCALE_PHASE", phase)
        .env("MOECAST_SCALE_INPUT", input)
        .env("MOECAST_SCALE_DATASET", dataset)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{phase}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(|x| x.parse::<f64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

fn du(path: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(path).unwrap().flatten() {
        let p = e.path();
        total += if p.is_dir() {
            du(&p)
        } else {
            e.metadata().map_or(0, |m| m.len())
        };
    }
    total
}

fn main() {
    if let Ok(phase) = std::env::var("MOECAST_SCALE_PHASE") {
        let input = PathBuf::from(std::env::var("MOECAST_SCALE_INPUT").unwrap());
        let dataset = PathBuf::from(std::env::var("MOECAST_SCALE_DATASET").unwrap());
        child(&phase, &input, &dataset);
        return;
    }
    let big: usize = std::env::var("MOECAST_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let per_response = (PROMPT + GENERATED - 1) * LAYERS as usize;
    println!("partitioned dataset: vLLM responses -> hive Parquet parts -> streamed stats");
    println!(
        "{:>12} {:>9} {:>10} {:>14} {:>12} {:>14} {:>12} {:>16}",
        "records",
        "responses",
        "parts MB",
        "import rec/s",
        "import RSS",
        "stats rec/s",
        "stats RSS",
        "one-file RSS"
    );
    for target in [1_000_000, big] {
        let dir = tempfile::tempdir().unwrap();
        let n = target.div_ceil(per_response);
        let records = n * per_response;
        let input = dir.path().join("responses");
        write_responses(&input, n);
        let dataset = dir.path().join("dataset");
        let (t_import, rss_import) = run_child("import", &input, &dataset);
        let parts_mb = du(&dataset) as f64 / 1e6;
        let (t_stats, rss_stats) = run_child("stats", &input, &dataset);
        let single = dir.path().join("single");
        std::fs::create_dir_all(&single).unwrap();
        let (_, rss_single) = run_child("single", &input, &single);
        println!(
            "{records:>12} {n:>9} {parts_mb:>10.1} {:>14.0} {:>8.0} MiB {:>14.0} {:>8.0} MiB {:>12.0} MiB",
            records as f64 / t_import,
            rss_import,
            records as f64 / t_stats,
            rss_stats,
            rss_single
        );
    }
}
