#!/usr/bin/env python3
"""Throughput of Hugging Face transformers on a checkpoint, for `make bench`.

Runs the same work as `moecast collect` does in collector/benches/collect.rs: for each
of N prompts of random token ids (seeded), a prefill forward then greedy decode with the
KV cache, one token at a time, with forward hooks on every router (as a collector
would). Prints one JSON line: {"tokens_per_s": ..., "tokens": ..., "seconds": ...}.

Usage: python3 tools/bench_transformers.py MODEL_DIR --prompts 8 --prompt-len 28 --new 32 --threads 1
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=28)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    routed = []
    for name, module in model.named_modules():
        if name.endswith(".mlp.gate") or name.endswith(".mlp.router") or name.endswith("block_sparse_moe.gate"):
            module.register_forward_hook(lambda m, i, o: routed.append((o[2] if isinstance(o, tuple) else o).detach()))
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (1, args.prompt_len)) for _ in range(args.prompts)]
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            out = model(ids, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens += ids.shape[1]
            for _ in range(args.new):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens += 1
    secs = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": tokens / secs, "tokens": tokens, "seconds": secs}))


if __name__ == "__main__":
    main()
