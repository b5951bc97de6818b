"""How much of layer l+1's routing a plain MLP can read from layer l's router input.

A reference point for `moecast train --features hidden`, outside moecast: one MLP per
layer pair (router input of layer l -> 512 -> 512 -> experts of layer l+1, SiLU, BCE,
AdamW 1e-3, 40 epochs) trained on one trace and scored on another by top-k recall
(= active-class F1 with equal set sizes). Needs torch and duckdb
(`pip install torch duckdb`); the traces come from `moecast collect --hidden-states`
converted to Parquet:

    moecast trace convert runs/demo/tiny-moe.mctrace -o /tmp/train.parquet
    moecast trace convert runs/demo/heldout.mctrace -o /tmp/heldout.parquet
    python3 tools/hidden_state_ceiling.py /tmp/train.parquet /tmp/heldout.parquet

On the demo's 6-sample trace it reaches 0.804 at +1; on `make demo-hidden`'s 12-sample
trace (runs/demo-hidden/tiny-moe.mctrace, same held-out trace) 0.814.

`.mctrace` traces are read directly (memory-mapped, no duckdb needed), which is what
large traces want; several training traces may be given before the held-out one:

    python3 tools/hidden_state_ceiling.py TRAIN.mctrace [MORE.mctrace ...] HELDOUT.mctrace [--steps N]

`--steps N` fits each MLP by N AdamW steps on batches of 256 drawn with replacement,
learning rate 1e-3 decayed to 0 by a cosine, instead of 40 epochs: the same budget
for any trace size (tools/corpus_predictor.sh uses 20000).
"""

import argparse
import json
import sys

import numpy as np
import torch
from torch import nn


def load(path):
    """Router inputs [tokens, layers, dim] (f32) and experts [tokens, layers, k], from a
    `.mctrace` or a Parquet trace."""
    if str(path).endswith(".mctrace"):
        return load_mctrace(path)
    import duckdb

    # The router-input channel's column (`router_input` in files written before channels).
    try:
        columns = [c[0] for c in duckdb.sql(f"describe select * from '{path}'").fetchall()]
        column = "router_inputs" if "router_inputs" in columns else "router_input"
        rows = duckdb.sql(
            f"select seq, pos, layer, experts, {column} from '{path}' order by seq, pos, layer"
        ).fetchall()
    except duckdb.Error as e:
        sys.exit(f"{path}: not a moecast Parquet trace with router inputs ({e})")
    n_layers = max(r[2] for r in rows) + 1
    tokens = {}
    for seq, pos, layer, experts, x in rows:
        tokens.setdefault((seq, pos), [None] * n_layers)[layer] = (experts, x)
    h = np.array([[np.asarray(c[1], np.float32) for c in t] for t in tokens.values()])
    e = np.array([[c[0] for c in t] for t in tokens.values()])
    return h, e


def load_mctrace(path):
    """`load` for the binary form: the header names each section's offset (see
    datasets/src/binary.rs); `experts` is u16 and `router_inputs` f16."""
    with open(path, "rb") as f:
        if f.read(8) != b"MOECTRC1":
            sys.exit(f"{path}: not a .mctrace file")
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta, n = header["meta"], header["n_tokens"]
    layers, k = len(meta["moe_layers"]), meta["top_k"]
    dim = next((c["width"] for c in meta.get("channels", []) if c["name"] == "router_inputs"),
               meta.get("router_input_dim"))
    if not dim:
        sys.exit(f"{path}: the trace has no router inputs (collect it with --hidden-states)")
    sections = {s["name"]: s for s in header["sections"]}

    def section(name, dtype, width):
        s = sections[name]
        return np.memmap(path, dtype, "r", offset=s["offset"], shape=(n, layers, width))

    return np.asarray(section("router_inputs", "<f2", dim), np.float32), np.asarray(section("experts", "<u2", k))


def multi_hot(experts, n_experts):
    y = np.zeros((len(experts), n_experts), np.float32)
    np.put_along_axis(y, experts.astype(np.int64), 1.0, axis=1)
    return torch.tensor(y)


def fit_mlp(x, y, steps=None):
    """One MLP (x's width -> 512 -> 512 -> y's width, SiLU) fitted to multi-hot targets y
    by BCE: AdamW 1e-3, weight decay 1e-2, 40 epochs of batches of 128, or with `steps`
    that many steps on batches of 256 drawn with replacement under a cosine decay (the
    caller seeds)."""
    mlp = nn.Sequential(
        nn.Linear(x.shape[1], 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(), nn.Linear(512, y.shape[1])
    )
    opt = torch.optim.AdamW(mlp.parameters(), 1e-3, weight_decay=1e-2)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if steps is not None else None

    def batches():
        if steps is not None:
            for _ in range(steps):
                yield torch.randint(0, len(x), (256,))
            return
        for _ in range(40):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 128):
                yield perm[i : i + 128]

    for idx in batches():
        loss = nn.functional.binary_cross_entropy_with_logits(mlp(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if decay is not None:
            decay.step()
    return mlp


def main():
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("traces", nargs="+", help="training traces, then the held-out trace")
    args.add_argument("--steps", type=int, help="fit each MLP by this many steps (see above)")
    args = args.parse_args()
    if len(args.traces) < 2:
        sys.exit("give one or more training traces and then the held-out trace")
    torch.manual_seed(0)
    train = [load(p) for p in args.traces[:-1]]
    for p, t in zip(args.traces[1:-1], train[1:]):
        if t[0].shape[1:] != train[0][0].shape[1:] or t[1].shape[1:] != train[0][1].shape[1:]:
            sys.exit(f"{p}: another routing shape than {args.traces[0]}")
    h_tr, e_tr = np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])
    h_te, e_te = load(args.traces[-1])
    print(f"{len(h_tr)} training tokens, {len(h_te)} held out", flush=True)
    n_layers = h_tr.shape[1]
    n_experts = int(max(e_tr.max(), e_te.max())) + 1
    k = e_tr.shape[2]
    hits = total = 0
    for l in range(n_layers - 1):
        x_tr, y_tr = torch.tensor(h_tr[:, l]), multi_hot(e_tr[:, l + 1], n_experts)
        x_te, y_te = torch.tensor(h_te[:, l]), multi_hot(e_te[:, l + 1], n_experts)
        mlp = fit_mlp(x_tr, y_tr, args.steps)
        with torch.no_grad():
            top = mlp(x_te).topk(k, dim=1).indices
            h = y_te.gather(1, top).sum().item()
        print(f"layer {l} -> {l + 1}: top-{k} recall {h / y_te.sum().item():.3f}", flush=True)
        hits, total = hits + h, total + y_te.sum().item()
    print(f"+1 layer, all layers: top-{k} recall {hits / total:.3f}")


if __name__ == "__main__":
    main()
