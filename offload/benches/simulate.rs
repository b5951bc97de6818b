//! Simulator throughput (`make bench`): expert accesses per second on a Qwen3-30B-A3B
//! shaped synthetic trace (48 MoE layers x 128 experts, top-8), 10% cache, no prefetch.

use std::time::Instant;

use datasets::synth::{synthetic_trace, SynthConfig};
use offload::simulate::{simulate, PrefetchPlan, SimConfig};

fn main() {
    let trace = synthetic_trace(&SynthConfig {
        n_layers: 48,
        n_experts: 128,
        top_k: 8,
        sequences: 8,
        tokens_per_sequence: 2048,
        stickiness: 0.3,
        zipf: 0.8,
        seed: 0,
    });
    let view = trace.view();
    let seqs = view.sequence_ranges();
    let plan = PrefetchPlan::empty("none", view.n_tokens(), 48);
    println!(
        "simulator: {} tokens x 48 layers x top-8, cache 10% (614 experts)",
        view.n_tokens()
    );
    for policy in ["lru", "lfu", "belady"] {
        let cfg = SimConfig {
            capacity: 614,
            per_layer: false,
            policy: policy.into(),
            bandwidth_gbps: 16.0,
            expert_bytes: 9.4e6,
            compute_us_per_layer: 100.0,
            attention_us_per_layer: 0.0,
            untimed: false,
            deadline_order: false,
            chunk_bytes: 0.0,
            planned: false,
        };
        let t0 = Instant::now();
        let r = simulate(&view, &seqs, &plan, &cfg).expect("simulate");
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "  {policy:<7} {:>6.1} M accesses/s  (hit rate {:.1}%, {:.2}s for {} accesses)",
            r.accesses as f64 / dt / 1e6,
            100.0 * r.hit_rate(),
            dt,
            r.accesses
        );
    }
}
