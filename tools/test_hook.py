#!/usr/bin/env python3
"""`make test-hook`: collector/python/moecast_hook.py on the fixture checkpoints (every
architecture, and those with a sliding window) must record the routing `moecast collect` records on the same token ids:
the same expert ids in the same order at every (position, MoE layer), weights to 1e-4,
and (one architecture) the same router inputs to f16 precision.

Needs torch and transformers (not part of `make test`). Usage:
    python3 tools/test_hook.py [path/to/moecast]
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "collector", "python"))
from moecast_hook import RoutingRecorder  # noqa: E402

FIXTURES = os.path.join(ROOT, "inference", "tests", "fixtures", "hf")
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss",
         "mixtral_sliding", "qwen2_moe_sliding", "qwen3_moe_sliding"]
NEW = 8


def read_jsonl(path):
    with open(path) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    return lines[0]["meta"], lines[1:]


def main():
    moecast = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "moecast")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            d = os.path.join(FIXTURES, arch)
            with open(os.path.join(d, "expected.json")) as f:
                ids = json.load(f)["prompts"][0]["input_ids"]
            inputs = arch == "qwen3_moe"
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
            model.eval()
            rec = RoutingRecorder(model, router_inputs=inputs, model_name=arch)
            with torch.no_grad(), rec.sequence("p0", ids):
                out = model.generate(
                    torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                    pad_token_id=0,
                )
            rec.set_tokens(out[0].tolist())
            hook_path = os.path.join(tmp, f"{arch}.hook.jsonl")
            rec.write(hook_path)
            rec.remove()
            ours = os.path.join(tmp, f"{arch}.collect.jsonl")
            cmd = [moecast, "collect", "--model", d, "--token-ids", ",".join(map(str, ids)),
                   "--max-new-tokens", str(NEW), "-o", ours]
            if inputs:
                cmd.append("--hidden-states")
            subprocess.run(cmd, check=True, capture_output=True)
            hm, hook = read_jsonl(hook_path)
            cm, coll = read_jsonl(ours)
            errors = []
            if hm["moe_layers"] != cm["moe_layers"] or hm["top_k"] != cm["top_k"]:
                errors.append(f"shape: hook {hm['moe_layers']} top-{hm['top_k']}, collect {cm['moe_layers']} top-{cm['top_k']}")
            if len(hook) != len(ids) + NEW - 1:
                errors.append(f"hook recorded {len(hook)} positions, expected {len(ids) + NEW - 1}")
            for h, c in zip(hook, coll):
                p = h["pos"]
                if h["token"] != c["token"]:
                    errors.append(f"pos {p}: token {h['token']} vs {c['token']}")
                if h["experts"] != c["experts"]:
                    errors.append(f"pos {p}: experts {h['experts']} vs {c['experts']}")
                for hw, cw in zip(h["weights"], c["weights"]):
                    if max(abs(a - b) for a, b in zip(hw, cw)) > 1e-4:
                        errors.append(f"pos {p}: weights {hw} vs {cw}")
                if inputs:
                    for hx, cx in zip(h["router_inputs"], c["router_inputs"]):
                        if max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(hx, cx)) > 2e-3:
                            errors.append(f"pos {p}: router inputs differ beyond f16 precision")
            status = "ok" if not errors else "FAILED"
            print(f"{arch:<12} {len(hook)} positions x {len(hm['moe_layers'])} MoE layers: {status}")
            for e in errors[:5]:
                print("   ", e)
            failures += bool(errors)
    print(f"hook: {len(ARCHS) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
