//! What a checkpoint says about its experts' storage, which the cache simulator uses.

use std::path::Path;

use inference::Checkpoint;

fn open(arch: &str) -> Checkpoint {
    Checkpoint::open(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf")
            .join(arch),
    )
    .unwrap()
}

#[test]
fn expert_bytes_per_layout() {
    // hidden 24, expert width 8, f32: gate + up + down = 3 x 24 x 8 x 4 bytes.
    assert_eq!(open("qwen3_moe").expert_bytes(0, 4), Some(2304));
    assert_eq!(open("mixtral").expert_bytes(1, 4), Some(2304));
    // bf16 shards: half of that.
    assert_eq!(
        open("qwen3_moe_sharded_bf16").expert_bytes(0, 4),
        Some(1152)
    );
    // gpt-oss stores all experts fused, with biases: [E, 24, 16] + [E, 16] + [E, 8, 24] + [E, 24].
    let g = open("gpt_oss");
    let e: usize = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(g.config_path()).unwrap(),
    )
    .unwrap()["num_local_experts"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(g.expert_bytes(0, e), Some((24 * 16 + 16 + 8 * 24 + 24) * 4));
    // A layer index past the model has no experts.
    assert_eq!(open("qwen3_moe").expert_bytes(99, 4), None);
}
