//! `make bench`: collector throughput (prefill + greedy decode with routing capture) on
//! the tiny Qwen3-MoE fixture checkpoint, per CPU backend, and the same work in Hugging
//! Face transformers (`tools/bench_transformers.py`) when torch is installed.
//! Run with `RAYON_NUM_THREADS=1` to compare at one thread (the Makefile does).

use std::path::Path;
use std::process::Command;

use collector::{collect, CollectConfig, Prompt};
use inference::device::BackendKind;
use inference::generate::Sampling;
use rand::{Rng, SeedableRng};

const PROMPTS: usize = 8;
const PROMPT_LEN: usize = 28;
const NEW: usize = 32;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("inference/tests/fixtures/hf/qwen3_moe");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let prompts: Vec<Prompt> = (0..PROMPTS)
        .map(|i| Prompt::Ids {
            name: format!("p{i}"),
            ids: (0..PROMPT_LEN).map(|_| rng.random_range(3..272)).collect(),
        })
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "collector on {} ({PROMPTS} prompts x {PROMPT_LEN} tokens + {NEW} decode), CPU threads: {threads}",
        model.display()
    );
    let mut best = 0f64;
    // burn-ndarray too when built (`--features backend/ndarray`).
    let backends: Vec<BackendKind> = ["flex", "ndarray"]
        .iter()
        .filter_map(|b| b.parse().ok())
        .collect();
    for backend in backends {
        let cfg = CollectConfig {
            model_dir: model.clone(),
            prompts: prompts.clone(),
            max_new_tokens: NEW,
            sampling: Sampling::Greedy,
            samples: 1,
            backend,
            add_special_tokens: false,
            channels: Vec::new(),
            output: dir.path().join("t.mctrace"),
        };
        collect(&cfg).expect("warm-up");
        let runs: Vec<f64> = (0..3)
            .map(|_| collect(&cfg).expect("collect").tokens_per_second())
            .collect();
        let tps = runs.iter().copied().fold(0.0, f64::max);
        best = best.max(tps);
        println!("  moecast collect, {backend:?}: {tps:>8.0} tokens/s (best of 3)");
    }
    let py = Command::new("python3")
        .arg(root.join("tools/bench_transformers.py"))
        .arg(&model)
        .args([
            "--prompts",
            &PROMPTS.to_string(),
            "--prompt-len",
            &PROMPT_LEN.to_string(),
        ])
        .args([
            "--new",
            &NEW.to_string(),
            "--threads",
            if threads == "all" { "2" } else { &threads },
        ])
        .output();
    match py {
        Ok(out) if out.status.success() => {
            let line = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value =
                serde_json::from_str(line.trim()).expect("bench_transformers JSON");
            let hf = v["tokens_per_s"].as_f64().unwrap_or(0.0);
            println!("  transformers (eager, same work, hooks on): {hf:>8.0} tokens/s");
            println!("  ratio moecast / transformers: {:.2}x", best / hf);
        }
        _ => println!("  transformers: skipped (python3 with torch + transformers not available)"),
    }
}
