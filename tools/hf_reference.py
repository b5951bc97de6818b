"""The reference runs of ``hf_fixtures.py``: router hooks that record each MoE layer's
top-k experts and weights (checked against an independent re-derivation from the router
logits, which also gives the score gaps), and prefill + greedy decode with the KV cache."""

import torch

DECODE_STEPS = 16
LOGITS_TOPN = 16


def r7(x):
    """Round to 7 significant digits (JSON friendly)."""
    if isinstance(x, (list, tuple)):
        return [r7(v) for v in x]
    return float(f"{float(x):.7g}")


# ----------------------------------------------------------------------------- routing


def find_routers(model):
    out = []
    for l, layer in enumerate(model.model.layers):
        for attr in ("gate", "router"):
            m = getattr(layer.mlp, attr, None)
            if m is not None and type(m).__name__.lower().endswith("topkrouter"):
                out.append((l, m))
    return out


def _kth_gap(scores, k):
    """gap between k-th and (k+1)-th largest per row (inf where fewer than k+1 finite)."""
    s = torch.sort(scores, dim=-1, descending=True).values
    a, b = s[:, k - 1], s[:, k]
    gap = a - b
    return torch.where(torch.isfinite(b), gap, torch.full_like(gap, float("inf")))


def _n_diff(a, b):
    return int((torch.sort(a, -1).values != torch.sort(b, -1).values).any(-1).sum())


def _v3_select(s, bias, ng, tg, k):
    choice = s + bias
    gs = choice.view(s.shape[0], ng, -1).topk(2, dim=-1).values.sum(-1)
    gsel = torch.topk(gs, tg, dim=-1).indices
    gmask = torch.zeros_like(gs).scatter_(1, gsel, 1.0).bool()
    mask = gmask.repeat_interleave(s.shape[1] // ng, dim=1)
    return torch.topk(choice.masked_fill(~mask, float("-inf")), k, dim=-1).indices


def _reference_route(arch, mod, logits):
    """Independent re-derivation of (ids set, weights by id, gaps) from router logits."""
    logits = logits.float()
    k = mod.top_k
    gaps = []
    changed = {}
    if arch in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        p = torch.softmax(logits, dim=-1)
        ids = torch.topk(p, k, dim=-1).indices
        w = p.gather(1, ids)
        norm = arch == "mixtral" or mod.norm_topk_prob
        if norm:
            w = w / w.sum(-1, keepdim=True)
        gaps.append(_kth_gap(p, k))
    elif arch == "gpt_oss":
        ids = torch.topk(logits, k, dim=-1).indices
        w = torch.softmax(logits.gather(1, ids), dim=-1)
        gaps.append(_kth_gap(logits, k))
    elif arch == "deepseek_v2":
        p = torch.softmax(logits, dim=-1)
        ng, tg = mod.num_group, mod.topk_group
        gs = p.view(p.shape[0], ng, -1).max(-1).values
        gsel = torch.topk(gs, tg, dim=-1).indices
        gmask = torch.zeros_like(gs).scatter_(1, gsel, 1.0).bool()
        mask = gmask.repeat_interleave(p.shape[1] // ng, dim=1)
        masked = p.masked_fill(~mask, 0.0)
        ids = torch.topk(masked, k, dim=-1).indices
        w = p.gather(1, ids) * mod.routed_scaling_factor
        gaps += [_kth_gap(gs, tg), _kth_gap(masked, k)]
        changed["group_limit"] = _n_diff(torch.topk(p, k, dim=-1).indices, ids)
    elif arch == "deepseek_v3":
        s = torch.sigmoid(logits)
        choice = s + mod.e_score_correction_bias.float()
        ng, tg = mod.num_group, mod.topk_group
        gs = choice.view(s.shape[0], ng, -1).topk(2, dim=-1).values.sum(-1)
        gsel = torch.topk(gs, tg, dim=-1).indices
        gmask = torch.zeros_like(gs).scatter_(1, gsel, 1.0).bool()
        mask = gmask.repeat_interleave(s.shape[1] // ng, dim=1)
        masked = choice.masked_fill(~mask, float("-inf"))
        ids = torch.topk(masked, k, dim=-1).indices
        w = s.gather(1, ids)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * mod.routed_scaling_factor
        gaps += [_kth_gap(gs, tg), _kth_gap(masked, k)]
        # informational: how often the correction bias / the group limit change the selected set
        changed["bias"] = _n_diff(_v3_select(s, torch.zeros_like(choice[0]), ng, tg, k), ids)
        changed["group_limit"] = _n_diff(torch.topk(choice, k, dim=-1).indices, ids)
    else:
        raise ValueError(arch)
    gap = torch.stack(gaps, 0).min(0).values
    return ids, w, gap, changed


class RouteRecorder:
    def __init__(self, arch, model):
        self.arch = arch
        self.routers = find_routers(model)
        self.moe_layers = [l for l, _ in self.routers]
        self.calls = []  # list of dict layer -> (ids[T,k], w[T,k])
        self.min_gap = float("inf")
        self.changed = {}
        self.decisions = 0
        self._cur = None
        self.handles = [m.register_forward_hook(self._hook(l)) for l, m in self.routers]

    def start(self):
        self._cur = {}

    def stop(self):
        assert sorted(self._cur) == self.moe_layers, (sorted(self._cur), self.moe_layers)
        self.calls.append(self._cur)
        self._cur = None
        return self.calls[-1]

    def _hook(self, layer):
        def fn(mod, inputs, output):
            logits, weights, ids = output
            weights = weights.detach().float().reshape(-1, mod.top_k)
            ids = ids.detach().reshape(-1, mod.top_k)
            order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
            ids_s, w_s = ids.gather(1, order), weights.gather(1, order)
            # independent check of the documented semantics
            rid, rw, gap, changed = _reference_route(self.arch, mod, logits.detach().reshape(ids.shape[0], -1))
            assert torch.equal(torch.sort(rid, -1).values, torch.sort(ids, -1).values), (self.arch, layer)
            rorder = torch.sort(rw, dim=-1, descending=True, stable=True).indices
            assert torch.allclose(rw.gather(1, rorder), w_s, rtol=1e-6, atol=1e-7), (self.arch, layer)
            self.min_gap = min(self.min_gap, float(gap.min()))
            if self._cur is not None:
                self.decisions += ids.shape[0]
                for kk, v in changed.items():
                    self.changed[kk] = self.changed.get(kk, 0) + v
                assert layer not in self._cur
                self._cur[layer] = (ids_s.tolist(), w_s.tolist())

        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------- running


def _cache_of(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


@torch.no_grad()
def run_case(model, rec, input_ids):
    """Prefill + greedy decode with the KV cache; returns a dict and the min argmax margin."""
    ids = torch.tensor([input_ids], dtype=torch.long)
    rec.start()
    out = model(input_ids=ids, use_cache=True)
    call = rec.stop()
    T = len(input_ids)
    layers = rec.moe_layers
    prefill = {
        "topk_ids": [[call[l][0][t] for l in layers] for t in range(T)],
        "topk_weights": [[r7(call[l][1][t]) for l in layers] for t in range(T)],
    }
    last = out.logits[0, -1].float()
    prefill_logits = last.clone()
    margins = []

    def margin(v):
        s = torch.topk(v, 2).values
        return float(s[0] - s[1])

    margins.append(margin(last))
    cache = _cache_of(out)
    generated = [int(torch.argmax(last))]
    steps = []
    seq = list(input_ids)
    for i in range(DECODE_STEPS):
        tok = generated[-1]
        seq.append(tok)
        rec.start()
        out = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
        call = rec.stop()
        cache = _cache_of(out)
        lg = out.logits[0, -1].float()
        # cross-check the cached step against an uncached forward over the whole sequence
        full = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].float()
        diff = float((full - lg).abs().max())
        assert diff < 1e-4, ("cache mismatch", i, diff)
        margins.append(margin(lg))
        top = torch.topk(lg, LOGITS_TOPN)
        nxt = int(torch.argmax(lg))
        steps.append(
            {
                "step": i,
                "position": len(seq) - 1,
                "input_id": tok,
                "topk_ids": [call[l][0][0] for l in layers],
                "topk_weights": [r7(call[l][1][0]) for l in layers],
                "logits_top_ids": top.indices.tolist(),
                "logits_top_values": r7(top.values.tolist()),
                "argmax": nxt,
            }
        )
        if i + 1 < DECODE_STEPS:
            generated.append(nxt)
    # the uncached cross-check forwards also fired the hooks (for gaps only); drop nothing.
    res = {
        "input_ids": list(input_ids),
        "prefill": prefill,
        "prefill_logits": r7(prefill_logits.tolist()),
        "decode": steps,
        "generated_ids": generated,
    }
    return res, min(margins)


def run_all(arch, model, cases):
    rec = RouteRecorder(arch, model)
    results, margins = [], []
    for c in cases:
        r, m = run_case(model, rec, c["input_ids"])
        entry = dict(c)
        entry.update(r)
        results.append(entry)
        margins.append(m)
    rec.remove()
    stats = {"routing_decisions": rec.decisions}
    stats.update({f"selection_changed_by_{k}": v for k, v in sorted(rec.changed.items())})
    return results, rec.moe_layers, rec.min_gap, min(margins), stats


@torch.no_grad()
def logits_of(model, cases):
    return [model(input_ids=torch.tensor([c["input_ids"]]), use_cache=False).logits.float() for c in cases]
