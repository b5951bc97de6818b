"""moecast's transformers hook: records every MoE layer's routing during ``generate()``
and writes moecast's interchange JSONL (``moecast trace convert`` / ``train`` read it).

One file, no install step: copy it next to your script (or add this folder to
``sys.path``)::

    from moecast_hook import RoutingRecorder
    rec = RoutingRecorder(model, router_inputs=False)        # hooks every router
    for name, ids in prompts:                               # batch size 1 per call
        with rec.sequence(name, ids):
            out = model.generate(torch.tensor([ids]), max_new_tokens=64)
        rec.set_tokens(out[0].tolist())                     # token ids of the sequence
    rec.write("trace.jsonl")
    rec.remove()

Routers are found by module:

* transformers 5 ``*TopKRouter`` modules (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3,
  GPT-OSS, ...): their output ``(router_logits, weights, indices)`` is recorded as is;
* remote-code DeepSeek-style ``MoEGate`` modules returning ``(topk_idx, topk_weight, ...)``;
* older transformers' ``mlp.gate`` / ``block_sparse_moe.gate`` linear gates, which return
  only logits: ids and weights are then the softmax top-k (``num_experts_per_tok``),
  renormalised when the config says ``norm_topk_prob`` (Mixtral always).

Ids are written largest weight first (ties keep the router's order), as ``moecast
collect`` does. Each router call covers the rows of one forward (batch 1: the prompt,
then one token per decode step); positions count the rows each layer has seen. The last
generated token is never forwarded by ``generate()``, so it has no routing. With
``router_inputs=True`` the router's input (the hidden state the gate reads) is recorded
too.
"""

import json
import re
from contextlib import contextmanager

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _routers(model):
    """(layer index, module, kind) of every router, in layer order."""
    found = {}
    for name, m in model.named_modules():
        hit = _LAYER.search(name)
        if not hit:
            continue
        cls = type(m).__name__.lower()
        last = name.rsplit(".", 1)[-1]
        if cls.endswith("topkrouter"):
            kind = "topk"
        elif cls == "moegate":
            kind = "moegate"
        elif last == "gate" and isinstance(m, torch.nn.Linear) and (
            name.endswith("mlp.gate") or name.endswith("block_sparse_moe.gate")
        ):
            kind = "linear"
        else:
            continue
        layer = int(hit.group(1))
        if layer not in found or kind != "linear":
            found[layer] = (m, kind)
    return [(l, m, k) for l, (m, k) in sorted(found.items())]


class RoutingRecorder:
    """Forward hooks on every router of ``model``; see the module docs."""

    def __init__(self, model, router_inputs=False, model_name=None):
        cfg = model.config
        self.cfg = cfg
        self.model_name = model_name or getattr(cfg, "_name_or_path", "") or type(model).__name__
        self.router_inputs = router_inputs
        self.routers = _routers(model)
        if not self.routers:
            raise ValueError("no MoE router modules found in this model")
        self.moe_layers = [l for l, _, _ in self.routers]
        self.top_k = int(getattr(cfg, "num_experts_per_tok", 0) or getattr(cfg, "moe_topk", 0))
        self.n_experts = int(
            getattr(cfg, "num_local_experts", 0)
            or getattr(cfg, "num_experts", 0)
            or getattr(cfg, "n_routed_experts", 0)
        )
        self.hidden = int(getattr(cfg, "hidden_size", 0))
        self.sequences = []
        self._cur = None
        self.handles = [m.register_forward_hook(self._hook(l, k)) for l, m, k in self.routers]

    @contextmanager
    def sequence(self, name, prompt_ids):
        """Records the forwards inside the block as one sequence (batch size 1)."""
        self._cur = {"name": name, "prompt": list(prompt_ids), "tokens": None, "rows": {l: [] for l in self.moe_layers}}
        try:
            yield self
        finally:
            self.sequences.append(self._cur)
            self._cur = None

    def set_tokens(self, token_ids):
        """Token ids of the last recorded sequence (prompt + generated)."""
        self.sequences[-1]["tokens"] = list(token_ids)

    def _hook(self, layer, kind):
        def fn(mod, inputs, output):
            if self._cur is None:
                return
            x = inputs[0] if inputs else None
            if kind == "topk":
                _, weights, ids = output
            elif kind == "moegate":
                ids, weights = output[0], output[1]
            else:
                logits = output.float().reshape(-1, output.shape[-1])
                p = torch.softmax(logits, dim=-1)
                weights, ids = torch.topk(p, self.top_k, dim=-1)
                if getattr(self.cfg, "norm_topk_prob", True):
                    weights = weights / weights.sum(-1, keepdim=True)
            k = ids.shape[-1]
            ids = ids.detach().reshape(-1, k)
            weights = weights.detach().float().reshape(-1, k)
            order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
            ids, weights = ids.gather(1, order), weights.gather(1, order)
            xs = None
            if self.router_inputs and x is not None:
                xs = x.detach().float().reshape(ids.shape[0], -1).tolist()
            rows = self._cur["rows"][layer]
            for r in range(ids.shape[0]):
                rows.append((ids[r].tolist(), weights[r].tolist(), xs[r] if xs else None))

        return fn

    def write(self, path):
        """Writes every recorded sequence as interchange JSONL (atomically)."""
        meta = {
            "model": self.model_name,
            "architecture": getattr(self.cfg, "model_type", None),
            "n_layers": int(self.cfg.num_hidden_layers),
            "moe_layers": self.moe_layers,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "n_shared_experts": 0,
            "source": "moecast_hook",
            "ranked": True,
        }
        if self.router_inputs:
            meta["router_input_dim"] = self.hidden
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps({"meta": meta}) + "\n")
            for s in self.sequences:
                n = max(len(r) for r in s["rows"].values())
                tokens = s["tokens"] or s["prompt"]
                for pos in range(n):
                    per = [s["rows"][l][pos] if pos < len(s["rows"][l]) else None for l in self.moe_layers]
                    rec = {
                        "seq": s["name"],
                        "pos": pos,
                        "phase": "prefill" if pos < len(s["prompt"]) else "decode",
                        "token": tokens[pos] if pos < len(tokens) else None,
                        "experts": [p[0] if p else None for p in per],
                        "weights": [p[1] if p else None for p in per],
                    }
                    if self.router_inputs:
                        rec["router_inputs"] = [p[2] if p else None for p in per]
                    f.write(json.dumps(rec) + "\n")
        import os

        os.replace(tmp, path)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
