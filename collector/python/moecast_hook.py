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

Prefetch mode: ``ExpertOffloader`` runs a transformers 5 MoE model (fused ``<Arch>Experts``
modules: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, ...) with at most
``capacity`` experts of each MoE layer resident in the model's own parameters; the full
weights stay on a slow tier (host copies, or a safetensors file read on a miss) and every
non-resident expert's slice is NaN, so an expert computed without being loaded cannot go
unnoticed. Routed experts not resident are loaded on demand (least recently used out);
with a ``moecast.Predictor`` the experts it forecasts are staged ahead of their layer::

    import moecast
    from moecast_hook import ExpertOffloader
    model = AutoModelForCausalLM.from_pretrained(d, experts_implementation="eager")
    off = ExpertOffloader(model, capacity=3, predictor=moecast.Predictor("checkpoints/NAME"))
    out = model.generate(torch.tensor([ids]), max_new_tokens=64)   # batch size 1
    print(off.report())     # hit_rate, demand_loads, staged_loads, staged_used, ...
    off.remove()            # full weights back, hooks off

``ExpertOffloader(model, capacity)`` without a predictor is the on-demand (LRU) baseline.
"""

import json
import os
import re
from collections import OrderedDict
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
            meta["channels"] = [{"name": "router_inputs", "dtype": "f16", "width": self.hidden}]
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
        os.replace(tmp, path)

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# -- prefetch mode ----------------------------------------------------------------------

#: Experts implementations known to read only the routed experts' slices of the fused
#: weights (so NaN in the others never reaches an output).
_SLICE_READING = ("eager", "batched_mm", "grouped_mm")


def _moe_shape(cfg):
    top_k = int(getattr(cfg, "num_experts_per_tok", 0) or getattr(cfg, "moe_topk", 0))
    n_experts = int(
        getattr(cfg, "num_local_experts", 0) or getattr(cfg, "num_experts", 0) or getattr(cfg, "n_routed_experts", 0)
    )
    return n_experts, top_k


class _Layer:
    """One MoE layer's fused experts: its parameters, the slow tier's copies and the
    resident set (expert -> staged and not used yet; oldest use / staging first)."""

    def __init__(self, index, layer, router_name, experts_name, experts, params):
        self.index = index
        self.layer = layer
        self.router_name = router_name
        self.experts_name = experts_name
        self.experts = experts
        self.params = params  # [(name, Parameter)]
        self.host = {}
        self.resident = OrderedDict()
        self.expert_bytes = sum(p[0].numel() * p.element_size() for _, p in params)


class ExpertOffloader:
    """Runs a transformers 5 MoE model with at most ``capacity`` experts of each MoE layer
    resident (a per-layer budget, as offloading runtimes that give every layer its own
    expert cache do).

    The model's expert parameters keep their shape (transformers' code runs unmodified):
    resident experts hold their weights, every other expert's slice is NaN. The full
    weights live on the slow tier: ``slow_tier="host"`` keeps a CPU copy of each fused
    experts parameter; a path ending in ``.safetensors`` writes them to that file once and
    reads one expert's slices from it on every load. Everything starts cold (no expert
    resident). ``remove()`` puts every expert back and takes the hooks off.

    Hooks: on each router call (the routers ``RoutingRecorder`` finds) the routed experts
    not resident are loaded before the layer's experts module runs (demand loads); a load
    into a full layer evicts, first, staged experts never routed since they were staged
    (oldest staging first), then the least recently routed expert, never one the current
    call routes. A forward of several rows (the prompt) may route more distinct experts in
    a layer than ``capacity``: they are all loaded for that layer's experts call and the
    layer is trimmed back to ``capacity`` right after it.

    With a ``predictor`` (a ``moecast.Predictor`` or its directory; its MoE layers, experts
    and top-k must match the model's) the offloader keeps one predictor session per
    sequence and stages forecasts only from what has been computed: when a decode step's
    forward starts, ``predict_next(token, budget)`` for the token's first layers (the first
    ``horizon`` of them for a lookahead predictor, all of them for a next-token one); after
    each MoE layer routes, ``predict_lookahead(token, experts_so_far, budget)`` for the
    ``horizon`` layers after it (with the router's input for ``--features hidden``
    predictors); when a forward's last MoE layer has routed, ``observe(token, experts)`` for
    each of its rows in order (the prompt's tokens, then each decoded token). A staged
    expert already resident is only marked recently used. A forward starting at position
    0 starts a new sequence (``session.reset()``); the resident set carries over.

    Loads are synchronous copies, so a staged expert is resident when its router runs
    (a runtime would issue staged loads on a copy stream and overlap them with compute).
    ``report()`` counts decode steps (single-row forwards after the prompt): ``hit_rate``
    (routed experts resident when their router ran), ``demand_loads``, ``staged_loads``,
    ``staged_used`` (staged loads routed before being evicted), ``staged_wasted`` (evicted
    unused), their bytes; the prompt's routing and loads are counted apart (``prefill_*``).
    Batch size 1. The experts implementation must read only the routed experts' slices
    (transformers' ``eager``, ``batched_mm``, ``grouped_mm``).
    """

    def __init__(self, model, capacity, predictor=None, budget=None, horizon=None, slow_tier="host"):
        cfg = model.config
        self.model = model
        self.n_experts, self.top_k = _moe_shape(cfg)
        routers = _routers(model)
        if not routers:
            raise ValueError(f"{type(model).__name__}: no MoE router modules found in this model")
        if not self.n_experts or not self.top_k:
            raise ValueError(f"{type(model).__name__}: the config names no expert count or top-k")
        if not self.top_k <= capacity < self.n_experts:
            raise ValueError(
                f"capacity {capacity} per layer: give at least the top-{self.top_k} one token routes and fewer than "
                f"the {self.n_experts} experts of a layer"
            )
        self.capacity = int(capacity)
        names = {id(m): n for n, m in model.named_modules()}
        self.layers = [self._layer(model, i, l, names[id(m)], k) for i, (l, m, k) in enumerate(routers)]
        self.moe_layers = [L.layer for L in self.layers]
        m = len(self.layers)

        self.predictor = None
        self.session = None
        self.horizon = 0
        self.budget = int(budget or self.top_k)
        if predictor is not None:
            import moecast

            where = ""
            if isinstance(predictor, (str, os.PathLike)):
                where = f"{predictor}: "
                predictor = moecast.Predictor(predictor)
            got = (predictor.n_moe_layers, predictor.n_experts, predictor.top_k)
            if got != (m, self.n_experts, self.top_k):
                raise ValueError(
                    f"{where}predictor shape {got[0]} MoE layers x {got[1]} experts, top-{got[2]}, does not match "
                    f"the model's {m} MoE layers x {self.n_experts} experts, top-{self.top_k} "
                    f"({type(model).__name__}, MoE layers {self.moe_layers})"
                )
            if predictor.router_input_dim and predictor.router_input_dim != int(getattr(cfg, "hidden_size", 0)):
                raise ValueError(
                    f"{where}the predictor reads router inputs of width {predictor.router_input_dim}, "
                    f"the model's are {getattr(cfg, 'hidden_size', None)}"
                )
            if not 1 <= self.budget <= self.capacity:
                raise ValueError(f"budget {self.budget}: stage 1 to capacity ({self.capacity}) experts per layer")
            self.predictor = predictor
            self.session = predictor.session()
            self.horizon = predictor.horizon if horizon is None else max(0, min(int(horizon), predictor.horizon))
        self.policy = "predictor" if self.predictor is not None else "on-demand"

        self._file = None
        self._store(slow_tier)
        for L in self.layers:
            for e in range(self.n_experts):
                self._poison(L, e)
        self._ctx = None
        self.reset_stats()
        self.handles = [model.register_forward_pre_hook(self._on_forward, with_kwargs=True),
                        model.register_forward_hook(self._on_forward_end)]
        for L, (_, router, _) in zip(self.layers, routers):
            self.handles.append(router.register_forward_hook(self._on_route(L)))
            self.handles.append(L.experts.register_forward_hook(self._on_experts(L)))

    # -- setup --------------------------------------------------------------------------

    def _layer(self, model, index, layer, router_name, kind):
        parent_name = router_name.rsplit(".", 1)[0]
        experts_name = parent_name + ".experts"
        experts = getattr(model.get_submodule(parent_name), "experts", None)
        supported = ("transformers 5 fused <Arch>Experts modules (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, "
                     "GPT-OSS, ...) whose parameters are [n_experts, ...]")
        if experts is None:
            raise ValueError(f"{router_name} ({kind} router) has no experts module beside it ({experts_name}); "
                             f"supported: {supported}")
        cls = type(experts).__name__
        if isinstance(experts, (torch.nn.ModuleList, torch.nn.ModuleDict)) or not cls.endswith("Experts"):
            raise ValueError(f"{experts_name} ({cls}) is not a fused experts module (one module per expert: older "
                             f"transformers or remote code); supported: {supported}")
        params = list(experts.named_parameters(recurse=False))
        nested = [n for n, _ in experts.named_parameters() if "." in n]
        if not params or nested:
            raise ValueError(f"{experts_name} ({cls}): expert weights are not all plain parameters of the module "
                             f"({', '.join(nested) or 'none'}); supported: {supported}")
        for pname, p in params:
            if p.dim() < 1 or p.shape[0] != self.n_experts or not p.is_floating_point():
                raise ValueError(f"{experts_name}.{pname} ({cls}): shape {tuple(p.shape)} {p.dtype}, expected a "
                                 f"floating-point [{self.n_experts}, ...] tensor; supported: {supported}")
        impl = getattr(getattr(experts, "config", None), "_experts_implementation", None) or "eager"
        if impl not in _SLICE_READING:
            raise ValueError(f"{experts_name} ({cls}) runs experts_implementation={impl!r}, which may read every "
                             f"expert's weights; load the model with experts_implementation in {_SLICE_READING}")
        return _Layer(index, layer, router_name, experts_name, experts, params)

    def _store(self, slow_tier):
        if slow_tier == "host":
            for L in self.layers:
                for pname, p in L.params:
                    L.host[pname] = p.detach().to("cpu", copy=True)
                    if p.is_cuda:
                        L.host[pname] = L.host[pname].pin_memory()
            return
        path = os.fspath(slow_tier)
        if not path.endswith(".safetensors"):
            raise ValueError(f"slow_tier {slow_tier!r}: give 'host' or a path ending in .safetensors")
        from safetensors import safe_open
        from safetensors.torch import save_file

        tensors = {f"{L.experts_name}.{pname}": p.detach().to("cpu").contiguous()
                   for L in self.layers for pname, p in L.params}
        save_file(tensors, path)
        self._file = safe_open(path, framework="pt")
        self.slow_tier_path = path

    def _fetch(self, L, pname, e):
        if self._file is None:
            return L.host[pname][e]
        return self._file.get_slice(f"{L.experts_name}.{pname}")[e : e + 1][0]

    def _load(self, L, e):
        with torch.no_grad():
            for pname, p in L.params:
                p.data[e].copy_(self._fetch(L, pname, e), non_blocking=True)

    def _poison(self, L, e):
        with torch.no_grad():
            for _, p in L.params:
                p.data[e].fill_(float("nan"))

    # -- residency ----------------------------------------------------------------------

    def _evict_one(self, L, keep):
        """Frees one slot of layer L (not an expert in `keep`); False when none can go."""
        victim = next((e for e, staged in L.resident.items() if staged and e not in keep), None)
        if victim is None:
            victim = next((e for e in L.resident if e not in keep), None)
        if victim is None:
            return False
        if L.resident.pop(victim):
            self.stats["staged_wasted"] += 1
        self._poison(L, victim)
        return True

    def _admit(self, L, e, keep, staged):
        while len(L.resident) >= self.capacity and self._evict_one(L, keep):
            pass
        self._load(L, e)
        L.resident[e] = staged

    def _stage(self, L, experts):
        """Loads the forecast experts of layer L that are not resident (best first, at most
        capacity of them); those already resident become the most recently used."""
        want = []
        for e in experts:
            e = int(e)
            if e < self.n_experts and e not in want:
                want.append(e)
        want = want[: self.capacity]
        for e in want:
            if e in L.resident:
                L.resident.move_to_end(e)
                continue
            self._admit(L, e, set(want), staged=True)
            self.stats["staged_loads"] += 1
            self.stats["staged_bytes"] += L.expert_bytes

    def _route(self, L, ids, decode):
        """Makes the routed experts ([rows, k] ids) of layer L resident; counts them."""
        before = set(L.resident)
        need = set()
        for row in ids:
            need.update(row)
        s = self.stats
        for row in ids:
            for e in row:
                hit = e in before
                if decode:
                    s["routed"] += 1
                    s["hits"] += hit
                else:
                    s["prefill_routed"] += 1
                    s["prefill_hits"] += hit
                if e not in L.resident:
                    self._admit(L, e, need, staged=False)
                    if decode:
                        s["demand_loads"] += 1
                        s["demand_bytes"] += L.expert_bytes
                    else:
                        s["prefill_loads"] += 1
                elif L.resident[e]:
                    L.resident[e] = False
                    s["staged_used"] += 1
                L.resident.move_to_end(e)

    def resident(self):
        """{model layer: sorted resident expert ids}."""
        return {L.layer: sorted(L.resident) for L in self.layers}

    # -- hooks --------------------------------------------------------------------------

    def _on_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if ids is not None:
            batch, rows = ids.shape[0], ids.shape[-1]
            tokens = ids[0].tolist()
        elif embeds is not None:
            batch, rows, tokens = embeds.shape[0], embeds.shape[1], None
        else:
            return
        if batch != 1:
            raise ValueError(f"ExpertOffloader runs batch size 1, this forward has {batch} sequences")
        if tokens is None and self.session is not None:
            raise ValueError("ExpertOffloader with a predictor needs input_ids (the token ids the predictor reads), "
                             "not inputs_embeds")
        start = None
        pos = kwargs.get("position_ids")
        if pos is not None:
            start = int(pos.reshape(-1)[0])
        else:
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            if cache is not None and hasattr(cache, "get_seq_length"):
                start = int(cache.get_seq_length())
        new_sequence = start == 0 or (start is None and rows > 1)
        if new_sequence and self.session is not None:
            self.session.reset()
        decode = rows == 1 and not new_sequence
        self._ctx = {"tokens": tokens, "rows": rows, "decode": decode, "routing": []}
        if decode:
            self.stats["decode_steps"] += 1
        if decode and self.session is not None:
            first = self.session.predict_next(tokens[0], self.budget)
            for L in self.layers[: self.horizon or len(self.layers)]:
                self._stage(L, first[L.index])

    def _on_forward_end(self, module, args, output):
        self._ctx = None

    def _on_route(self, L):
        def fn(mod, inputs, output):
            ctx = self._ctx
            if ctx is None:  # a forward of a submodule, not of the model: residency only
                ctx = {"tokens": None, "rows": None, "decode": False, "routing": []}
            if isinstance(output, tuple) and len(output) == 3:
                _, weights, ids = output
            else:
                ids, weights = output[0], output[1]
            k = ids.shape[-1]
            ids = ids.detach().reshape(-1, k)
            order = torch.sort(weights.detach().float().reshape(-1, k), dim=-1, descending=True, stable=True).indices
            ids = ids.gather(1, order).tolist()
            self._route(L, ids, ctx["decode"])
            if self.session is None or ctx["tokens"] is None or len(ctx["routing"]) != L.index:
                return
            ctx["routing"].append(ids)
            m = len(self.layers)
            if ctx["decode"] and self.horizon > 0 and L.index + 1 < m:
                x = None
                if self.predictor.router_input_dim:
                    x = inputs[0].detach().float().reshape(-1)[-self.predictor.router_input_dim :].cpu().numpy()
                so_far = [r[0] for r in ctx["routing"]]
                ahead = self.session.predict_lookahead(ctx["tokens"][0], so_far, self.budget, x)
                for h in range(min(self.horizon, m - L.index - 1)):
                    self._stage(self.layers[L.index + 1 + h], ahead[h])
            if L.index == m - 1:  # the forward's routing is complete
                for r, token in enumerate(ctx["tokens"]):
                    self.session.observe(token, [layer[r] for layer in ctx["routing"]])

        return fn

    def _on_experts(self, L):
        def fn(mod, inputs, output):
            while len(L.resident) > self.capacity and self._evict_one(L, ()):
                pass

        return fn

    # -- results ------------------------------------------------------------------------

    def reset_stats(self):
        """Zeroes the counts (the resident set stays)."""
        self.stats = dict.fromkeys(
            ["decode_steps", "routed", "hits", "demand_loads", "demand_bytes", "staged_loads", "staged_bytes",
             "staged_used", "staged_wasted", "prefill_routed", "prefill_hits", "prefill_loads"], 0)

    def report(self):
        """The counts so far: decode steps' routed experts, the share resident when their
        router ran (hit_rate), demand and staged loads (and bytes), staged loads routed
        before eviction (staged_used) and evicted unused (staged_wasted), the prompt's apart."""
        s = dict(self.stats)
        s.update(
            policy=self.policy,
            capacity=self.capacity,
            n_experts=self.n_experts,
            moe_layers=len(self.layers),
            budget=self.budget if self.session is not None else 0,
            horizon=self.horizon,
            expert_bytes=self.layers[0].expert_bytes,
            hit_rate=s["hits"] / max(s["routed"], 1),
            staged_used_rate=s["staged_used"] / max(s["staged_loads"], 1),
        )
        return s

    def remove(self):
        """Every expert back in the parameters (the model is whole again), hooks off."""
        for h in self.handles:
            h.remove()
        self.handles = []
        for L in self.layers:
            for e in range(self.n_experts):
                self._load(L, e)
            L.resident.clear()
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
