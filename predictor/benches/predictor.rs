//! Predictor benchmarks (`make bench`):
//!
//! - `train`: training throughput (target tokens per second) of the default-size
//!   predictor on the demo model's routing shape (6 MoE layers x 16 experts, top-2),
//!   for both tasks, and the same model in PyTorch on the same CPU when torch is
//!   installed (`tools/bench_predictor_torch.py`);
//! - `scale`: `predictor::train` itself (validation, export and checkpoints included)
//!   for 3 epochs on a 512 k-token synthetic trace, each epoch's steps per second: a
//!   training that slows down after its first epoch shows here;
//! - `latency`: one decode step of [`OnlinePredictor`] with its incremental state
//!   (predict, then observe), run with `RAYON_NUM_THREADS=1` for one core.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use datasets::examples::{ExampleSet, Split, SplitConfig};
use datasets::synth::{synthetic_trace, SynthConfig};
use datasets::{save_trace, TraceFormat};
use predictor::device::BackendKind;
use predictor::model::{BatchTensors, ExpertPredictor};
use predictor::{
    LoadedPredictor, OnlinePredictor, PredictorConfig, Task, TrainOptions, TrainSettings,
};

const STEPS: usize = 20;

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

fn bench_train(trace: &Path) {
    let set = ExampleSet::open(&[trace.to_path_buf()], &SplitConfig::default()).expect("open");
    let shape = set.shape();
    println!(
        "predictor training throughput: default size (d_model 128, 3 blocks, 4 heads, context 128), \
         batch 16 windows, {} MoE layers x {} experts, CPU threads {}",
        shape.n_moe,
        shape.n_experts,
        threads()
    );
    for task in [Task::NextToken, Task::Lookahead] {
        let config = PredictorConfig::new(shape, task);
        let device = BackendKind::Flex.device();
        device.seed(0);
        let ad = device.autodiff();
        let mut model = ExpertPredictor::new(&config, &ad);
        let mut optim = AdamWConfig::new().init();
        let windows = set.windows(Split::Train, config.context);
        let queries = config.queries();
        let mut examples = 0usize;
        let mut elapsed = 0.0;
        for (i, chunk) in windows.chunks(16).cycle().take(STEPS + 3).enumerate() {
            let t0 = Instant::now();
            let batch = set.batch(chunk, config.token_buckets);
            let bt = BatchTensors::new(&batch, shape, &ad);
            let loss = model.loss(&bt, &queries, 1.0);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(2e-3, model, grads);
            let _ = loss.into_scalar::<f32>();
            if i >= 3 {
                elapsed += t0.elapsed().as_secs_f64();
                examples += batch
                    .token_index
                    .iter()
                    .filter(|&&t| t != usize::MAX)
                    .count();
            }
        }
        let burn_rate = examples as f64 / elapsed;
        println!(
            "  {:<10} burn-flex: {burn_rate:>8.0} examples/s ({:.1} ms/step)",
            task.as_str(),
            elapsed / STEPS as f64 * 1e3
        );
        match torch_rate(task, &threads()) {
            Some((rate, line)) => println!(
                "  {:<10} pytorch:   {rate:>8.0} examples/s  -> Burn / PyTorch = {:.2}  [{line}]",
                task.as_str(),
                burn_rate / rate
            ),
            None => println!("  (PyTorch comparison skipped: python3 with torch not found)"),
        }
    }
}

fn torch_rate(task: Task, threads: &str) -> Option<(f64, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/bench_predictor_torch.py");
    let out = Command::new("python3")
        .arg(script)
        .args([
            "--task",
            task.as_str(),
            "--threads",
            threads,
            "--steps",
            &STEPS.to_string(),
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
