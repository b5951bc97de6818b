"""How much of layer l+1's routing a speculative run of layer l+1's attention recovers.

When layer l routes, the runtime holds the residual after layer l's attention, h_l, and the
keys and values of every earlier token at layer l+1 (its KV cache). Layer l+1's input is
h_l plus layer l's expert output, which does not exist yet. This script estimates that
input as h_l, runs layer l+1's attention on it (query and the token's own key and value
from the estimate, earlier tokens' from the true cache), applies layer l+1's post-attention
norm and gate, and scores the top-k against the recorded routing. It also trains one MLP
per layer pair (as `hidden_state_ceiling.py` does) on layer l's router input, on the
speculative router input, and on both, to show what a learned predictor could read from it.

Rows printed, top-k recall at +1 layer on the second trace:
- cross-layer gate: layer l+1's gate on layer l's router input (moecast's `gate`);
- speculative attention: the estimate above through layer l+1's gate;
- pre-attention gate: layer l+1's gate on its own input before attention (moecast's
  `pre-attention gate`, available one attention block before the routing);
- exact: the same attention code on the true input, which must give 1.000 (a self-check).

Needs torch, transformers and duckdb (`pip install torch transformers duckdb`), a
Qwen3-MoE checkpoint (the shipped demo model) and two traces of it from
`moecast collect --hidden-states`, converted to Parquet (the token ids are replayed):

    moecast trace convert runs/demo/tiny-moe.mctrace -o /tmp/train.parquet
    moecast trace convert runs/demo/heldout.mctrace -o /tmp/heldout.parquet
    python3 tools/speculative_attention.py checkpoints/tiny-moe /tmp/train.parquet /tmp/heldout.parquet

About 10 minutes on 2 cores for the demo's traces.
"""

import sys

import duckdb
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import apply_rotary_pos_emb

from hidden_state_ceiling import fit_mlp


def load_sequences(path):
    """Token ids per sequence and the recorded experts [tokens, layers, k], in order."""
    try:
        rows = duckdb.sql(
            f"select seq, pos, layer, token, experts from '{path}' order by seq, pos, layer"
        ).fetchall()
    except duckdb.Error as e:
        sys.exit(f"{path}: not a moecast Parquet trace ({e})")
    seqs = {}
    for seq, pos, layer, token, experts in rows:
        if token is None:
            sys.exit(f"{path}: sequence {seq} position {pos} has no token id to replay")
        if experts is None:
            sys.exit(f"{path}: sequence {seq} position {pos} layer {layer} has no routing")
        s = seqs.setdefault(seq, {})
        s.setdefault(pos, [token, []])[1].append(experts)
    out = []
    for seq, by_pos in seqs.items():
        positions = sorted(by_pos)
        if positions != list(range(len(positions))):
            sys.exit(f"{path}: sequence {seq} has gaps in its positions")
        ids = [by_pos[p][0] for p in positions]
        experts = torch.tensor([by_pos[p][1] for p in positions])
        out.append((ids, experts))
    return out


class Model:
    """The checkpoint in transformers, with the pieces of each decoder layer the
    forecasts read."""

    def __init__(self, path):
        self.hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if self.hf.config.model_type != "qwen3_moe":
            sys.exit(f"{path}: model_type {self.hf.config.model_type}, this script reads qwen3_moe")
        self.layers = self.hf.model.layers
        self.k = self.hf.config.num_experts_per_tok

    def gate(self, layer, x):
        """Router logits of decoder layer `layer` for router inputs x."""
        return nn.functional.linear(x, self.layers[layer].mlp.gate.weight)

    def residuals(self, ids):
        """Per layer: its input and the residual after its attention, [tokens, dim]."""
        store = [{} for _ in self.layers]
        hooks = []
        for i, layer in enumerate(self.layers):

            def pre(m, args, out, i=i):
                store[i]["input"] = args[0][0].clone()

            def post(m, args, out, i=i):
                store[i]["mid"] = args[0][0].clone()

            hooks.append(layer.input_layernorm.register_forward_hook(pre))
            hooks.append(layer.post_attention_layernorm.register_forward_hook(post))
        with torch.no_grad():
            self.hf(torch.tensor([ids]))
        for h in hooks:
            h.remove()
        return store

    def attention(self, layer, x_own, x_cache):
        """Layer `layer`'s attention output at each position t: query, key and value of t
        from x_own[t], keys and values of the earlier positions from x_cache."""
        block = self.layers[layer]
        at = block.self_attn
        t, hd = x_own.shape[0], at.head_dim
        cos, sin = self.hf.model.rotary_emb(x_own[None], torch.arange(t)[None])

        def project(x):
            n = block.input_layernorm(x)[None]
            q = at.q_norm(at.q_proj(n).view(1, t, -1, hd)).transpose(1, 2)
            k = at.k_norm(at.k_proj(n).view(1, t, -1, hd)).transpose(1, 2)
            v = at.v_proj(n).view(1, t, -1, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            groups = q.shape[1] // k.shape[1]
            return q[0], k[0].repeat_interleave(groups, 0), v[0].repeat_interleave(groups, 0)

        q, k_own, v_own = project(x_own)
        _, k_cache, v_cache = project(x_cache)
        scores = q @ k_cache.transpose(-1, -2) * at.scaling
        own = (q * k_own).sum(-1) * at.scaling
        eye = torch.eye(t, dtype=torch.bool)
        scores = torch.where(eye, own[:, :, None].expand_as(scores), scores)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.softmax(scores, -1)
        out = (p * ~eye) @ v_cache + p.diagonal(dim1=-2, dim2=-1)[..., None] * v_own
        return at.o_proj(out.transpose(0, 1).reshape(t, -1))


def forecasts(model, seqs):
    """Per token: router inputs [L, D], speculative router inputs of layers 1.. [L-1, D],
    the gates' logits per forecast [L-1, E], the recorded experts [L, k] and whether the
    model's own top-k matches the recording."""
    n_layers = len(model.layers)
    cols = {n: [] for n in ["router_input", "speculative", "cross", "spec", "pre", "exact"]}
    experts, agree = [], []
    with torch.no_grad():
        for ids, recorded in seqs:
            res = model.residuals(ids)
            r = [model.layers[l].post_attention_layernorm(res[l]["mid"]) for l in range(n_layers)]
            own = torch.stack([model.gate(l, r[l]).topk(model.k, -1).indices for l in range(n_layers)], 1)
            agree.append((own.sort(-1).values == recorded.sort(-1).values).all(-1))
            rows = {n: [] for n in ["speculative", "cross", "spec", "pre", "exact"]}
            for l in range(n_layers - 1):
                nxt, true_input = model.layers[l + 1], res[l + 1]["input"]
                estimate = res[l]["mid"]
                spec = nxt.post_attention_layernorm(estimate + model.attention(l + 1, estimate, true_input))
                exact = nxt.post_attention_layernorm(true_input + model.attention(l + 1, true_input, true_input))
                rows["speculative"].append(spec)
                rows["cross"].append(model.gate(l + 1, r[l]))
                rows["spec"].append(model.gate(l + 1, spec))
                rows["pre"].append(model.gate(l + 1, nxt.post_attention_layernorm(true_input)))
                rows["exact"].append(model.gate(l + 1, exact))
            cols["router_input"].append(torch.stack(r, 1))
            for n, v in rows.items():
                cols[n].append(torch.stack(v, 1))
            experts.append(recorded)
    out = {n: torch.cat(v) for n, v in cols.items()}
    out["experts"] = torch.cat(experts).long()
    out["agree"] = float(torch.cat(agree).float().mean())
    return out


def recall(pred, truth):
    """Top-k recall of predicted ids [..., k] against true ids [..., k]."""
    return float((pred[..., :, None] == truth[..., None, :]).any(-1).sum()) / truth.numel()


def mlp_recall(x_tr, y_tr, x_te, y_te, n_experts):
    """Recall of one MLP fitted as `hidden_state_ceiling.py` fits its own."""
    torch.manual_seed(0)
    mlp = fit_mlp(x_tr, torch.zeros(len(y_tr), n_experts).scatter_(1, y_tr, 1.0))
    with torch.no_grad():
        return recall(mlp(x_te).topk(y_te.shape[1], -1).indices, y_te)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    torch.manual_seed(0)
    model = Model(sys.argv[1])
    train = forecasts(model, load_sequences(sys.argv[2]))
    test = forecasts(model, load_sequences(sys.argv[3]))
    k, n_experts = model.k, model.hf.config.num_experts
    print(f"transformers' top-{k} equals the recorded routing for {test['agree']:.4f} of held-out (token, layer)s")
    truth = test["experts"][:, 1:]
    names = {"cross": "cross-layer gate", "spec": "speculative attention", "pre": "pre-attention gate", "exact": "exact (self-check)"}
    for col, name in names.items():
        print(f"{name:24s} +1 top-{k} recall {recall(test[col].topk(k, -1).indices, truth):.3f}")
    sums = [0.0, 0.0, 0.0]
    n_pairs = len(model.layers) - 1
    for l in range(n_pairs):
        y_tr, y_te = train["experts"][:, l + 1], test["experts"][:, l + 1]
        inputs = [
            (train["router_input"][:, l], test["router_input"][:, l]),
            (train["speculative"][:, l], test["speculative"][:, l]),
            (
                torch.cat([train["router_input"][:, l], train["speculative"][:, l]], 1),
                torch.cat([test["router_input"][:, l], test["speculative"][:, l]], 1),
            ),
        ]
        got = [mlp_recall(x_tr, y_tr, x_te, y_te, n_experts) for x_tr, x_te in inputs]
        sums = [s + g for s, g in zip(sums, got)]
        print(f"layer {l} -> {l + 1}: MLP on router input {got[0]:.3f}, on speculative {got[1]:.3f}, on both {got[2]:.3f}", flush=True)
    print(
        f"+1 layer, mean over layers: MLP on router input {sums[0] / n_pairs:.3f}, "
        f"on speculative {sums[1] / n_pairs:.3f}, on both {sums[2] / n_pairs:.3f}"
    )


if __name__ == "__main__":
    main()
