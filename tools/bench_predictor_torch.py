#!/usr/bin/env python3
"""The moecast expert predictor re-implemented in PyTorch, layer for layer, to compare
training throughput with the Burn implementation on the same CPU (`make bench` runs it
when torch is installed).

Same architecture as predictor/src/model.rs: token embedding + linear embedding of the
previous token's multi-hot routing, pre-LayerNorm blocks with ALiBi causal attention and
a SiLU feed-forward, and the per-query head (known-layer prefix, layer embedding, MLP,
per-layer output columns); masked BCE with logits; AdamW with per-parameter gradient
norm clipping. Random multi-hot batches of the same shape as the Rust benchmark, on the
CPU or (`--device cuda`) an NVIDIA GPU.

Prints one line: `torch examples/s: X` (examples = target tokens).
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads, ffn_mult, dropout):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn_in = nn.Linear(d, ffn_mult * d)
        self.ffn_out = nn.Linear(ffn_mult * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, bias):
        b, s, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=2)
        q, k, v = (t.reshape(b, s, self.heads, hd).transpose(1, 2) for t in (q, k, v))
        att = self.drop(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, s, d)
        x = x + self.drop(self.attn_out(y))
        return x + self.drop(self.ffn_out(F.silu(self.ffn_in(self.ffn_norm(x)))))


class ExpertPredictor(nn.Module):
    def __init__(self, n_moe, n_experts, d, layers, heads, ffn_mult, buckets, dropout):
        super().__init__()
        width = n_moe * n_experts
        self.n_moe, self.n_experts, self.d, self.heads = n_moe, n_experts, d, heads
        self.token_embed = nn.Embedding(buckets + 1, d)
        self.context_routing = nn.Linear(width, d, bias=False)
        self.blocks = nn.ModuleList(Block(d, heads, ffn_mult, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(d)
        self.query_routing = nn.Parameter(torch.randn(n_moe, n_experts, d) * 0.1)
        self.query_layer = nn.Embedding(n_moe, d)
        self.head_norm = nn.LayerNorm(d)
        self.head_in = nn.Linear(d, 2 * d)
        self.head_out = nn.Linear(2 * d, d)
        self.out_norm = nn.LayerNorm(d)
        self.output = nn.Linear(d, width)

    def alibi(self, s, device):
        slopes = torch.tensor([2 ** (-8 * (h + 1) / self.heads) for h in range(self.heads)], device=device)
        i = torch.arange(s, device=device)[:, None]
        j = torch.arange(s, device=device)[None, :]
        dist = (i - j).float()
        bias = -slopes[:, None, None] * dist
        return bias.masked_fill(j > i, float("-inf"))[None]

    def forward(self, tokens, prev_routing, routing, queries):
        b, s = tokens.shape
        n = b * s
        x = self.token_embed(tokens) + self.context_routing(prev_routing)
        bias = self.alibi(s, tokens.device)
        for blk in self.blocks:
            x = blk(x, bias)
        h = self.final_norm(x).reshape(n, self.d)
        per_layer = torch.einsum("nme,med->mnd", routing.reshape(n, self.n_moe, self.n_experts), self.query_routing)
        prefix = torch.cat([torch.zeros(1, n, self.d, device=tokens.device), per_layer.cumsum(0)[:-1]], 0)
        outs = []
        for known, horizon in queries:
            u = h + prefix[known] + self.query_layer.weight[known]
            u = u + self.head_out(F.silu(self.head_in(self.head_norm(u))))
            u = self.out_norm(u)
            cols = slice(known * self.n_experts, (known + horizon) * self.n_experts)
            outs.append(u @ self.output.weight[cols].T + self.output.bias[cols])
        return outs


def masked_bce(z, y, m, pos_weight):
    loss = F.binary_cross_entropy_with_logits(z, y, reduction="none",
                                              pos_weight=torch.tensor(pos_weight, device=z.device))
    return (loss * m).sum() / m.sum().clamp_min(1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-moe", type=int, default=6)
    ap.add_argument("--n-experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--buckets", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--task", default="next-token")
    ap.add_argument("--horizon", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = ExpertPredictor(a.n_moe, a.n_experts, a.d_model, a.layers, a.heads, 4, a.buckets, a.dropout).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.01)
    if a.task == "next-token":
        queries = [(0, a.n_moe)]
    else:
        queries = [(k, min(a.horizon, a.n_moe - k)) for k in range(1, a.n_moe)]
    b, s, width = a.batch, a.context, a.n_moe * a.n_experts

    def multi_hot():
        idx = torch.rand(b * s, a.n_moe, a.n_experts).topk(a.top_k, dim=2).indices
        return torch.zeros(b * s, a.n_moe, a.n_experts).scatter_(2, idx, 1.0).reshape(b * s, width).to(dev)

    routing = multi_hot()
    prev = multi_hot().reshape(b, s, width)
    tokens = torch.randint(0, a.buckets, (b, s)).to(dev)
    mask = torch.ones(b * s, a.n_moe, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        outs = m(tokens, prev, routing, queries)
        loss = 0
        for (known, horizon), z in zip(queries, outs):
            y = routing[:, known * a.n_experts:(known + horizon) * a.n_experts]
            mm = mask[:, known:known + horizon].repeat_interleave(a.n_experts, dim=1)
            loss = loss + masked_bce(z, y, mm, 1.0)
        loss = loss / len(queries)
        opt.zero_grad()
        loss.backward()
        for p in m.parameters():
            torch.nn.utils.clip_grad_norm_([p], 1.0)
        opt.step()

    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch examples/s: {a.steps * b * s / dt:.1f}  ({dt / a.steps * 1e3:.1f} ms/step, batch {b}, {where}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
