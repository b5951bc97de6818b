//! Predictor benchmarks (`make bench`):
//!
//! - `train`: training throughput (target tokens per second) of the default-size
//!   predictor on the demo model's routing shape (6 MoE layers x 16 experts, top-2),
//!   for both tasks at batch 16 and 64, on every CPU backend built (or
//!   `MOECAST_BENCH_DEVICE`), beside the same model in PyTorch on the same CPU (or GPU)
//!   when torch is installed (`tools/bench_predictor_torch.py`), with the ratio; `make
//!   bench` runs it at 1 and 2 threads;
//! - `scale`: `predictor::train` itself (validation, export and checkpoints included)
//!   for 3 epochs on a 512 k-token synthetic trace, each epoch's steps per second: a
//!   training that slows down after its first epoch shows here;
//! - `latency`: one decode step of [`OnlinePredictor`] with its incremental state
//!   (predict, then observe), run with `RAYON_NUM_THREADS=1` for one core.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use burn::optim::AdamWConfig;
use datasets::examples::{ExampleSet, Split, SplitConfig};
use datasets::synth::{synthetic_trace, SynthConfig};
use datasets::{save_trace, TraceFormat};
use predictor::batch::BatchTensors;
use predictor::device::BackendKind;
use predictor::model::ExpertPredictor;
use predictor::step::{loss_and_gradients, query_denominators, resolve_shards};
use predictor::{
    LoadedPredictor, OnlinePredictor, PredictorConfig, Task, TrainOptions, TrainSettings,
};

const STEPS: usize = 20;

/// The allocator the `moecast` binary uses (see src/main.rs).
#[global_allocator]
static GLOBAL: predictor::device::allocator::Allocator = predictor::device::allocator::Allocator;

fn synth(path: &Path) {
    let t = synthetic_trace(&SynthConfig {
        n_layers: 6,
        n_experts: 16,
        top_k: 2,
        sequences: 64,
        tokens_per_sequence: 128,
        stickiness: 0.3,
        zipf: 0.8,
        seed: 0,
    });
    save_trace(&t, path, Some(TraceFormat::Binary)).expect("write synthetic trace");
}

fn threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "1".into())
    })
}

/// The backends the training comparison runs: `MOECAST_BENCH_DEVICE` when set (`cuda`,
/// `wgpu`, ...: `tools/gpu_check.sh`), else every CPU backend this build has.
fn bench_backends() -> Vec<(String, BackendKind)> {
    match std::env::var("MOECAST_BENCH_DEVICE") {
        Ok(d) => {
            let kind = d
                .parse()
                .unwrap_or_else(|e| panic!("MOECAST_BENCH_DEVICE: {e}"));
            vec![(d, kind)]
        }
        Err(_) => ["flex", "ndarray"]
            .iter()
            .filter_map(|b| Some((b.to_string(), b.parse().ok()?)))
            .collect(),
    }
}

/// Training examples (target tokens) per second of the default predictor on `kind`,
/// `steps` timed steps of `batch` windows after 2 warm-up steps, counting the training
/// step alone as the PyTorch script does (it reuses one random batch); and the time spent
/// building the batches (host work) relative to the steps'.
fn burn_train_rate(
    set: &ExampleSet,
    task: Task,
    kind: BackendKind,
    batch: usize,
    steps: usize,
    shards: usize,
) -> (f64, f64) {
    let shape = set.shape();
    let config = PredictorConfig::new(shape, task);
    let device = kind.device();
    let ad = device.autodiff();
    let mut model = ExpertPredictor::new(&config, &ad, 0);
    let mut optim = AdamWConfig::new().init();
    let windows = set.windows(Split::Train, config.context);
    let queries = config.queries();
    let (mut examples, mut elapsed, mut building) = (0usize, 0.0, 0.0);
    for (i, chunk) in windows.chunks(batch).cycle().take(steps + 2).enumerate() {
        let t_batch = Instant::now();
        let b = set.batch(chunk, config.token_buckets);
        let denominators = query_denominators(&b, &queries, shape);
        let bts: Vec<BatchTensors> = b
            .split(shards)
            .iter()
            .map(|s| BatchTensors::new(s, shape, &ad))
            .collect();
        let built = t_batch.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let (_, grads) = loss_and_gradients(&model, &bts, &queries, 1.0, &denominators);
        model = optim.step(2e-3, model, grads);
        if i >= 2 {
            elapsed += t0.elapsed().as_secs_f64();
            building += built;
            examples += b.token_index.iter().filter(|&&t| t != usize::MAX).count();
        }
    }
    (examples as f64 / elapsed, building / elapsed)
}

fn bench_train(trace: &Path) {
    let set = ExampleSet::open(&[trace.to_path_buf()], &SplitConfig::default()).expect("open");
    let shape = set.shape();
    let threads = threads();
    println!(
        "predictor training throughput: default size (d_model 128, 3 blocks, 4 heads, context 128), \
         {} MoE layers x {} experts, CPU threads {threads}; examples = target tokens",
        shape.n_moe, shape.n_experts,
    );
    let backends = bench_backends();
    let torch_device = if backends.iter().any(|(n, _)| n.starts_with("cuda")) {
        "cuda"
    } else {
        "cpu"
    };
    for batch in [16, 64] {
        // About the same number of examples at either batch size.
        let steps = (STEPS * 16 / batch).max(5);
        for task in [Task::NextToken, Task::Lookahead] {
            let torch = torch_rate(task, &threads, batch, steps, torch_device);
            for (name, kind) in &backends {
                let auto = resolve_shards(0, *kind, batch);
                let mut shard_counts = vec![auto];
                if auto > 1 {
                    shard_counts.push(1);
                }
                for shards in shard_counts {
                    let (rate, building) = burn_train_rate(&set, task, *kind, batch, steps, shards);
                    let ratio = torch.as_ref().map_or(
                        "(PyTorch not found: python3 with torch)".into(),
                        |(t, _)| format!("pytorch {t:>7.0}  -> Burn / PyTorch = {:.2}", rate / t),
                    );
                    println!(
                        "  {:<10} batch {batch:>2}, {threads} threads: burn-{name} {shards} shard(s) {rate:>7.0} \
                         examples/s, {ratio} (building the batches: +{:.0}%)",
                        task.as_str(),
                        building * 100.0
                    );
                }
            }
            if let Some((_, line)) = torch {
                println!("             [{line}]");
            }
        }
    }
}

fn torch_rate(
    task: Task,
    threads: &str,
    batch: usize,
    steps: usize,
    device: &str,
) -> Option<(f64, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/bench_predictor_torch.py");
    let out = Command::new("python3")
        .arg(script)
        .args([
            "--task",
            task.as_str(),
            "--threads",
            threads,
            "--batch",
            &batch.to_string(),
            "--steps",
            &steps.to_string(),
            "--device",
            device,
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.starts_with("torch examples/s:"))?
        .to_string();
    let rate = line.split_whitespace().nth(2)?.parse().ok()?;
    Some((rate, line))
}

fn bench_latency(trace: &Path, dir: &Path) {
    println!(
        "predictor decode-step latency (OnlinePredictor, incremental state), CPU threads {}",
        threads()
    );
    let set = ExampleSet::open_for_test(&[trace.to_path_buf()], None).expect("open");
    let view = set.view(0);
    let n_moe = set.shape().n_moe;
    for task in [Task::NextToken, Task::Lookahead] {
        let out = dir.join(task.as_str());
        let mut opts = TrainOptions {
            traces: vec![trace.to_path_buf()],
            config: PredictorConfig::new(set.shape(), task),
            split: SplitConfig::default(),
            settings: TrainSettings {
                max_epochs: 1,
                ..TrainSettings::default()
            },
            backend: BackendKind::Flex,
            out: out.clone(),
            progress: false,
            run_steps: None,
        };
        opts.settings.patience = 1;
        predictor::train(&opts).expect("train a predictor to serve");
        let device = BackendKind::Flex.device();
        let mut online = OnlinePredictor::new(LoadedPredictor::load(&out, &device).expect("load"));
        let tokens = 400;
        let mut predict_us = Vec::with_capacity(tokens);
        let mut step_us = Vec::with_capacity(tokens);
        for t in 0..tokens {
            let token = view.token[t];
            let layers: Vec<&[u16]> = (0..n_moe)
                .map(|m| view.layer(t, m).expect("computed"))
                .collect();
            let t0 = Instant::now();
            match task {
                Task::NextToken => {
                    online.predict_next(token).expect("predict");
                }
                Task::Lookahead => {
                    for known in 1..n_moe {
                        online
                            .predict_lookahead(token, &layers[..known])
                            .expect("predict");
                    }
                }
            }
            let t1 = Instant::now();
            let routing: Vec<Option<&[u16]>> = layers.iter().map(|l| Some(*l)).collect();
            online.observe(token, &routing).expect("observe");
            if t >= 10 {
                predict_us.push((t1 - t0).as_secs_f64() * 1e6);
                step_us.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        let stat = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (
                v.iter().sum::<f64>() / v.len() as f64,
                v[v.len() / 2],
                v[v.len() * 99 / 100],
            )
        };
        let (mean, p50, p99) = stat(&mut step_us);
        let (pm, _, _) = stat(&mut predict_us);
        let what = match task {
            Task::NextToken => "next-token (1 forecast of all layers)".to_string(),
            Task::Lookahead => format!("lookahead ({} forecasts, one per layer)", n_moe - 1),
        };
        println!(
            "  {what}: {mean:.0} us/token mean, p50 {p50:.0}, p99 {p99:.0} (forecasts {pm:.0} us of it), \
             {tokens} tokens with a {}-token sliding window",
            opts.config.context
        );
    }
}

fn bench_scale(dir: &Path) {
    let trace = dir.join("scale.mctrace");
    let t = synthetic_trace(&SynthConfig {
        n_layers: 6,
        n_experts: 16,
        top_k: 2,
        sequences: 4000,
        tokens_per_sequence: 128,
        stickiness: 0.3,
        zipf: 0.8,
        seed: 1,
    });
    save_trace(&t, &trace, Some(TraceFormat::Binary)).expect("write synthetic trace");
    let set = ExampleSet::open_for_test(std::slice::from_ref(&trace), None).expect("open");
    let opts = TrainOptions {
        traces: vec![trace],
        config: PredictorConfig::new(set.shape(), Task::Lookahead),
        split: SplitConfig {
            validation: 0.02,
            test: 0.0,
            seed: 0,
        },
        settings: TrainSettings {
            max_epochs: 3,
            patience: 3,
            ..TrainSettings::default()
        },
        backend: BackendKind::Flex,
        out: dir.join("scale-predictor"),
        progress: false,
        run_steps: None,
    };
    let steps_per_epoch = set
        .windows(Split::Test, opts.config.context)
        .len()
        .div_ceil(opts.settings.batch_size) as f64
        * 0.98;
    println!(
        "predictor training at scale: {} tokens, default lookahead predictor, 3 epochs, \
         about {steps_per_epoch:.0} steps per epoch, CPU threads {}",
        set.split_tokens(Split::Test),
        threads()
    );
    let s = predictor::train(&opts).expect("train at scale");
    let first = s.history.first().map_or(0.0, |e| e.steps_per_s);
    for e in &s.history {
        println!(
            "  epoch {}: {:.2} steps/s ({:.0} examples/s; {:.0} s with validation), {:.2}x epoch 1",
            e.epoch,
            e.steps_per_s,
            e.examples_per_s,
            e.seconds,
            e.steps_per_s / first
        );
    }
}

fn main() {
    predictor::device::allocator::retain_freed_memory();
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("synth.mctrace");
    synth(&trace);
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = which.is_empty();
    if all || which.iter().any(|w| w == "train") {
        bench_train(&trace);
    }
    if all || which.iter().any(|w| w == "scale") {
        bench_scale(dir.path());
    }
    if all || which.iter().any(|w| w == "latency") {
        bench_latency(&trace, dir.path());
    }
}
