//! `make bench`: the offloading engine on the shipped demo model. Collects a training
//! trace (demo prompts), trains the demo's lookahead predictor and a small next-token one, then generates the held-out prompts
//! with 10% and 25% of the experts resident, read from disk on demand (LRU, LFU) or
//! prefetched by the predictor, and with cache-aware routing. Each configuration runs 5
//! times (interleaved); the median decode tokens/s is reported with hit rate and stall.

use std::path::Path;

use collector::{collect, read_prompts, CollectConfig};
use datasets::examples::{RoutingShape, SplitConfig};
use inference::device::BackendKind;
use inference::generate::Sampling;
use offload::cache::EvictionPolicy;
use offload::engine::EngineReport;
use offload::{run_offloaded, CacheSize, OffloadRunConfig};
use predictor::{PredictorConfig, Task, TrainOptions, TrainSettings};

const REPS: usize = 5;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("checkpoints/tiny-moe");
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("demo.mctrace");
    collect(&CollectConfig {
        model_dir: model.clone(),
        prompts: read_prompts(&root.join("prompts/demo.txt")).expect("demo prompts"),
        max_new_tokens: 100,
        sampling: Sampling::Temperature {
            temperature: 0.8,
            seed: 0,
        },
        samples: 6,
        backend: BackendKind::Flex,
        add_special_tokens: false,
        channels: Vec::new(),
        output: trace.clone(),
    })
    .expect("collect");
    let shape = RoutingShape {
        n_moe: 6,
        n_experts: 16,
        top_k: 2,
    };
    // The demo's lookahead predictor (default size), and a small next-token one whose
    // decode step costs less on the decode thread.
    let big = dir.path().join("predictor-lookahead");
    let small = dir.path().join("predictor-small");
    let small_config = PredictorConfig::new(shape, Task::NextToken)
        .with_d_model(64)
        .with_n_layers(2)
        .with_n_heads(2);
    for (out, config) in [
        (&big, PredictorConfig::new(shape, Task::Lookahead)),
        (&small, small_config),
    ] {
        predictor::train(&TrainOptions {
            traces: vec![trace.clone()],
            config,
            split: SplitConfig {
                validation: 0.1,
                test: 0.0,
                seed: 0,
            },
            settings: TrainSettings {
                max_epochs: 15,
                batch_size: 4,
                warmup_steps: 50,
                ..TrainSettings::default()
            },
            backend: BackendKind::Flex,
            out: out.clone(),
            progress: false,
            run_steps: None,
        })
        .expect("train");
    }

    let heldout = read_prompts(&root.join("prompts/heldout.txt")).expect("held-out prompts");
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "offloading engine: tiny-moe (96 experts of 98 KB, bf16 on disk), {} held-out prompts x 32 greedy tokens, {} loader threads, CPU threads {threads}; median of {REPS}",
        heldout.len(),
        offload::engine::DEFAULT_LOADER_THREADS
    );
    println!(
        "  {:<5} {:<44} {:>9} {:>6} {:>6} {:>11} {:>10}",
        "cache", "configuration", "tokens/s", "hit", "late", "stall/token", "vs LRU"
    );
    // (name, policy, predictor, layer forecasts, pre-attention gate, logit lens,
    // cache-aware margin)
    let small = Some(&small);
    let configs = [
        ("LRU, on demand", "lru", None, false, false, false, 0.0),
        ("LFU, on demand", "lfu", None, false, false, false, 0.0),
        (
            "next-use, on demand",
            "next-use",
            None,
            false,
            false,
            false,
            0.0,
        ),
        (
            "LRU + learned (small, next token)",
            "lru",
            small,
            false,
            false,
            false,
            0.0,
        ),
        (
            "LRU + learned (default, next token + layers)",
            "lru",
            Some(&big),
            true,
            false,
            false,
            0.0,
        ),
        (
            "LRU + pre-attention gate",
            "lru",
            None,
            false,
            true,
            false,
            0.0,
        ),
        (
            "LRU + learned (small) + pre-attention gate",
            "lru",
            small,
            false,
            true,
            false,
            0.0,
        ),
        (
            "next-use + learned (small)",
            "next-use",
            small,
            false,
            false,
            false,
            0.0,
        ),
        (
            "next-use + learned (small) + lens",
            "next-use",
            small,
            false,
            false,
            true,
            0.0,
        ),
        (
            "LRU + learned (small) + cache-aware 0.05",
            "lru",
            small,
            false,
            false,
            false,
            0.05,
        ),
    ];
    for cache in ["10%", "25%"] {
        let cfgs: Vec<OffloadRunConfig> = configs
            .iter()
            .map(
                |&(_, policy, pred, layers, pre, lens, margin)| OffloadRunConfig {
                    model_dir: model.clone(),
                    prompts: heldout.clone(),
                    max_new_tokens: 32,
                    sampling: Sampling::Greedy,
                    backend: BackendKind::Flex,
                    add_special_tokens: false,
                    cache: cache.parse::<CacheSize>().expect("cache size"),
                    policy: policy.parse::<EvictionPolicy>().expect("policy"),
                    predictor: pred.cloned(),
                    token_table: None,
                    blend: None,
                    oracle_lead: None,
                    budget: offload::planner::PrefetchBudget::Auto,
                    prefetch_guard: true,
                    alternate_prefetch: None,
                    oracle_planned: false,
                    layer_forecasts: layers,
                    pre_attention: pre,
                    lens,
                    routing_margin: margin,
                    loader_threads: offload::engine::DEFAULT_LOADER_THREADS,
                    read_streams: offload::engine::DEFAULT_READ_STREAMS,
                    compare_in_memory: false,
                    quality: Vec::new(),
                    replay: None,
                    replay_tokens: 0,
                },
            )
            .collect();
        // Repetitions interleave the configurations, so drift of the machine hits all alike.
        let mut runs: Vec<Vec<EngineReport>> = vec![Vec::new(); cfgs.len()];
        for _ in 0..REPS {
            for (cfg, out) in cfgs.iter().zip(runs.iter_mut()) {
                out.push(run_offloaded(cfg).expect("run").report);
            }
        }
        let mut lru = 0.0;
        for ((name, ..), mut reps) in configs.iter().zip(runs) {
            reps.sort_by(|a, b| a.tokens_per_s().total_cmp(&b.tokens_per_s()));
            let r = &reps[REPS / 2];
            if lru == 0.0 {
                lru = r.tokens_per_s();
            }
            println!(
                "  {:<5} {:<44} {:>9.1} {:>5.1}% {:>5.1}% {:>8.3} ms {:>9.2}x",
                cache,
                name,
                r.tokens_per_s(),
                100.0 * r.hit_rate(),
                100.0 * r.late as f64 / r.accesses.max(1) as f64,
                r.stall_ms_per_token(),
                r.tokens_per_s() / lru
            );
        }
    }
    let cfg = OffloadRunConfig {
        model_dir: model,
        prompts: heldout,
        max_new_tokens: 32,
        sampling: Sampling::Greedy,
        backend: BackendKind::Flex,
        add_special_tokens: false,
        cache: CacheSize::Fraction(1.0),
        policy: EvictionPolicy::Lru,
        predictor: None,
        token_table: None,
        blend: None,
        oracle_lead: None,
        budget: offload::planner::PrefetchBudget::Auto,
        prefetch_guard: true,
        alternate_prefetch: None,
        oracle_planned: false,
        layer_forecasts: false,
        pre_attention: false,
        lens: false,
        routing_margin: 0.0,
        loader_threads: offload::engine::DEFAULT_LOADER_THREADS,
        read_streams: offload::engine::DEFAULT_READ_STREAMS,
        compare_in_memory: true,
        quality: Vec::new(),
        replay: None,
        replay_tokens: 0,
    };
    let r = run_offloaded(&cfg).expect("run");
    println!(
        "  all experts in memory: {:.1} tokens/s",
        r.in_memory_tokens_per_s.unwrap_or(0.0)
    );
}
