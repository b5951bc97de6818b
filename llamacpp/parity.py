#!/usr/bin/env python3
"""Routing parity between llama.cpp and ``moecast collect`` on the same token ids.

    moecast collect --model checkpoints/tiny-moe --prompts prompts/heldout.txt --hidden-states -o ref.jsonl
    python3 llamacpp/parity.py --reference ref.jsonl --model tiny-moe.f32.gguf

runs llama.cpp over the reference's token ids (each whole sequence as one batch, every
row's routing kept) and compares (``--llamacpp TRACE`` compares a trace collected
already). Prints the share of (token, MoE layer) cells whose
top-k sets are equal, how many of those also agree in rank order, the mismatches, and,
when both traces carry router inputs, how far apart they are.
"""

import argparse
import json
import os
import sys
import tempfile

import moecast_llamacpp as mcl


def read_jsonl(path):
    """(meta, records) of an interchange JSONL trace; errors name the file and line."""
    lines = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
    if not lines or not isinstance(lines[0], dict) or "meta" not in lines[0]:
        raise ValueError(f"{path}: the first line is not a meta line")
    return lines[0]["meta"], lines[1:]


def prompts_from_trace(ref_path, out_path):
    """Writes each reference sequence's token ids as a .jsonl prompt file (one line per
    sequence, "id" = its name); returns the number of sequences."""
    _, recs = read_jsonl(ref_path)
    seqs = {}
    for r in recs:
        seqs.setdefault(r["seq"], {})[r["pos"]] = r["token"]
    with open(out_path, "w") as f:
        for name, toks in seqs.items():
            ids = [toks[p] for p in sorted(toks)]
            if any(t is None for t in ids):
                raise ValueError(f"{ref_path}: sequence {name} has tokens without ids")
            f.write(json.dumps({"id": name, "token_ids": ids}) + "\n")
    return len(seqs)


def compare(ref_path, ours_path):
    """{"cells", "same_set", "same_order", "mismatches": [(seq, pos, layer, ref, ours)]}
    over the cells both traces routed."""
    ref_meta, ref = read_jsonl(ref_path)
    meta, ours = read_jsonl(ours_path)
    if (ref_meta["n_experts"], ref_meta["top_k"], len(ref_meta["moe_layers"])) != (
        meta["n_experts"], meta["top_k"], len(meta["moe_layers"])
    ):
        raise ValueError(f"{ref_path} and {ours_path} have different MoE shapes")
    by_key = {(r["seq"], r["pos"]): r for r in ours}
    cells = same_set = same_order = 0
    mismatches = []
    input_err = None  # largest |difference| / largest |value| of a router input, both traced
    for r in ref:
        o = by_key.get((r["seq"], r["pos"]))
        if o is None:
            continue
        if o["token"] != r["token"]:
            raise ValueError(f"{r['seq']} position {r['pos']}: token {o['token']} against {r['token']}")
        for layer, (a, b) in enumerate(zip(r["experts"], o["experts"])):
            if a is None or b is None:
                continue
            cells += 1
            if set(a) == set(b):
                same_set += 1
                same_order += a == b
            else:
                mismatches.append((r["seq"], r["pos"], layer, a, b))
        for x, y in zip(r.get("router_inputs") or [], o.get("router_inputs") or []):
            if x is not None and y is not None:
                scale = max(max(abs(v) for v in x), 1e-12)
                err = max(abs(u - v) for u, v in zip(x, y)) / scale
                input_err = err if input_err is None else max(input_err, err)
    if cells == 0:
        raise ValueError(f"{ref_path} and {ours_path} share no routed (sequence, position, layer) cell: "
                         "do their sequence names match?")
    return {"cells": cells, "same_set": same_set, "same_order": same_order, "mismatches": mismatches,
            "router_input_rel_err": input_err}


def _has_router_inputs(meta):
    """Whether a trace meta lists router inputs (as a channel, or in the older spelling)."""
    return bool(meta.get("router_input_dim")) or any(
        c.get("name") == "router_inputs" for c in meta.get("channels", []))


def main(argv=None):
    ap = argparse.ArgumentParser(description="top-k set parity of llama.cpp's routing against a moecast trace")
    ap.add_argument("--reference", required=True, help="moecast collect's trace, interchange JSONL")
    ap.add_argument("--model", help="GGUF file: runs llama.cpp over the reference's token ids")
    ap.add_argument("--llamacpp", help="or: llama.cpp's trace of those ids, already collected")
    ap.add_argument("-o", "--output", help="with --model: keep llama.cpp's trace here")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if bool(args.model) == bool(args.llamacpp):
        ap.error("give --model or --llamacpp")
    try:
        ours = args.llamacpp
        tmp = tempfile.TemporaryDirectory()
        if args.model:
            ids = os.path.join(tmp.name, "ids.jsonl")
            prompts_from_trace(args.reference, ids)
            meta, _ = read_jsonl(args.reference)
            model = mcl.LlamaCppModel(args.model, router_inputs=_has_router_inputs(meta))
            ours = args.output or os.path.join(tmp.name, "llamacpp.jsonl")
            try:
                mcl.collect(model, mcl.read_prompts(ids, model), ours, max_new_tokens=0)
            finally:
                model.close()
        c = compare(args.reference, ours)
    except (OSError, ValueError, mcl.LlamaCppError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = max(c["cells"], 1)
    print(f"{args.model or args.llamacpp}: {c['same_set']}/{c['cells']} (token, layer) top-k sets equal "
          f"({100 * c['same_set'] / n:.2f}%), {c['same_order']} also in the same rank order "
          f"({100 * c['same_order'] / n:.2f}%)")
    if c["router_input_rel_err"] is not None:
        print(f"router inputs: largest difference {c['router_input_rel_err']:.2e} of the vector's largest value")
    for seq, pos, layer, a, b in c["mismatches"][:10]:
        print(f"  {seq} position {pos} layer {layer}: moecast {a}, llama.cpp {b}")
    if args.json:
        with open(args.json + ".partial", "w") as f:
            json.dump(c, f)
        os.replace(args.json + ".partial", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
