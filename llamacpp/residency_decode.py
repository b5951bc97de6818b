"""Greedy (or seeded) decoding inside llama.cpp with a bounded resident set of experts
(expert_residency.py): prompts or a replayed trace, on demand or staging what a moecast
predictor forecasts. See moecast_llamacpp.py.
"""

import time

import numpy as np

from expert_residency import ExpertResidency, PlannedResidency
from moecast_llamacpp import LlamaCppError, sample


def decode_with_residency(model, prompts, capacity, max_new_tokens, predictor=None, budget=None,
                          temperature=0.0, seed=0, replay=None, replay_tokens=None, horizon=None,
                          plan_timings=None, guard=True, threads=None, eviction="lfu"):
    """Decoding with at most `capacity` experts resident: each prompt runs as one batch
    (it only warms the resident set), then up to `max_new_tokens` are decoded one at a
    time (greedy, or seeded sampling: sequence i draws with seed + i, so every mode decodes
    the same tokens). With `replay` (moecast.read_trace's dict of a trace with this
    model's MoE shape), every recorded sequence is decoded token by token from its own ids
    instead, each layer's routing forced to the recorded experts (up to `replay_tokens`
    tokens in all). With a moecast `predictor`, each token's layers are forecast from its
    id before it runs and the layers ahead after each layer routes, and their experts
    staged: the best `budget` of each forecast layer (up to `horizon` layers ahead), or
    with `budget="auto"` what moecast's planner judges worth a read (every layer's
    forecast offered, its best top-k; it measures the read and layer times,
    or plans with `plan_timings`, (read, layer) in microseconds; with `guard`, moecast's
    prefetch guard turns forecasting and staging off in the windows of decode steps where
    they measure slower than without; a moecast.PrefetchGuard given as `guard` is kept,
    so calls that share one measure once, as a runtime's requests would). The layers
    ahead are forecast while a layer's missing experts are read (a layer with none
    forecasts nothing, as in the C harness). `threads`, (N, M): llama.cpp runs on M
    threads in the decode steps that forecast, on N in the others. `eviction` ("lfu", "lru"
    or "next-use"): which used expert the resident set drops first (ExpertResidency). Residency
    and time are counted over the decode steps."""
    m = len(model.experts.moe_layers)
    top_k = model.experts.top_k
    session = predictor.session() if predictor is not None else None
    planned = session is not None and budget == "auto"
    horizon = min(horizon or predictor.horizon, predictor.horizon) if predictor is not None else 0
    if planned:
        horizon = predictor.horizon
        budget = top_k
    budget = budget or (predictor.top_k if predictor is not None else 0)
    if capacity < top_k:
        raise LlamaCppError(f"a resident set of {capacity} experts cannot hold one layer's top-{top_k}")
    if planned:
        import moecast

        if capacity <= top_k:
            raise LlamaCppError(f"a resident set of {capacity} experts leaves no room to stage beside a layer's "
                                f"top-{top_k}")
        read_us, layer_us = plan_timings or (None, None)
        res = PlannedResidency(model.experts, capacity,
                               moecast.Planner(m, model.experts.n_experts, top_k, capacity, read_us, layer_us),
                               top_k, measured=plan_timings is not None, eviction=eviction)
        stage = res.offer
        if guard is True:
            guard = moecast.PrefetchGuard()
        guard = guard or None
        if capacity >= m * model.experts.n_experts:  # every expert stays: nothing to forecast
            session = guard = None
    else:
        # the forecast for the layers ahead, and as many again still to be used; what
        # demand paging keeps never shrinks below one layer's experts
        slots = min(2 * budget * max(horizon, 1), capacity - top_k) if session else 0
        if session is not None and slots < 1:
            raise LlamaCppError(f"a resident set of {capacity} experts leaves no room to stage beside a layer's "
                                f"top-{top_k}")
        res = ExpertResidency(model.experts, capacity, slots, eviction)
        stage = res.stage
        guard = None
    reads_inputs = bool(predictor is not None and predictor.router_input_dim)
    if reads_inputs and replay is not None and "router_inputs" not in replay:
        raise LlamaCppError("this predictor reads router inputs: the replayed trace records none")
    if reads_inputs and replay is None and not model.router_inputs:
        raise LlamaCppError("this predictor reads router inputs: load the model with router_inputs=True")
    # replayed, the forced token's recorded router inputs [layer, width] (the model's own
    # would not match the forced routing)
    state = {"token": None, "so_far": [], "count": False, "forced": None, "inputs": None, "prefill": False, "on": True}

    def routed(i, ids):
        if state["prefill"]:  # the prompt's batch: every row's experts ran
            res.use(i, np.unique(ids), count=False, observe=False)
            return
        state["so_far"].append(ids[0].astype(np.uint16))

        def forecast_ahead():  # while this layer's missing experts are read
            if not reads_inputs:
                x = None
            elif state["inputs"] is not None:
                x = state["inputs"][i]
            else:
                x = model.rows["inputs"][i][-1][0]
            ahead = session.predict_lookahead(state["token"], np.stack(state["so_far"]), budget, x)
            for h in range(min(horizon, m - i - 1)):
                stage(i + 1 + h, ahead[h][ahead[h] != 0xFFFF])

        forecasts = session is not None and state["on"] and i + 1 < m and horizon > 0
        res.use(i, ids[0], count=state["count"], meanwhile=forecast_ahead if forecasts else None)

    def step(token, pos, count=True):
        """One decode step; returns its seconds."""
        state.update(token=token, so_far=[], count=count, on=guard is None or guard.enabled)
        if threads is not None:
            model.set_threads(threads[session is not None and state["on"]])
            fewer[0] += count and model.threads < threads[0]
        t0 = time.perf_counter()
        if planned:
            res.planner.token_started()
        if session is not None and state["on"]:
            first = session.predict_next(token, budget)
            for h in range(m if planned else min(max(horizon, 1), m)):
                stage(h, first[h])
        model.decode([token], pos, all_logits=False)
        if session is not None:
            session.observe(token, np.stack(state["so_far"]))
        dt = time.perf_counter() - t0
        if guard is not None and count:  # the steps the table times
            guard.step_done(dt)
        return dt

    fewer = [0]  # counted steps on fewer threads
    off_before = guard.steps_off if guard is not None else 0
    res.drop_all()
    model.on_routed = routed
    decode_s, steps = 0.0, 0
    try:
        if replay is None:
            for seq, (_, prompt) in enumerate(prompts):
                rng = np.random.default_rng(seed + seq)
                model.clear()
                state.update(token=None, so_far=[], count=False, prefill=True)
                routing = model.decode(prompt, 0, all_logits=True)
                state["prefill"] = False
                if session is not None:
                    session.reset()
                    for pos, tok in enumerate(prompt):
                        session.observe(tok, np.stack([r[pos] for r in routing["topk"]]).astype(np.uint16))
                tokens = list(prompt)
                for n in range(max_new_tokens):
                    nxt = sample(model.last_logits(), temperature, rng)
                    tokens.append(nxt)
                    if n == max_new_tokens - 1 or model.is_eog(nxt) or len(tokens) >= model.n_ctx:
                        break
                    decode_s += step(nxt, len(tokens) - 1)
                    steps += 1
        else:
            model.force = lambda i, n: state["forced"][i][None, :]
            for tokens, experts, inputs in replay_sequences(replay, model, m):
                model.clear()
                if session is not None:
                    session.reset()
                for pos, tok in enumerate(tokens[: model.n_ctx]):
                    if replay_tokens is not None and steps >= replay_tokens:
                        break
                    state["forced"] = experts[pos]
                    state["inputs"] = inputs[pos] if reads_inputs else None
                    dt = step(tok, pos, count=pos > 0)
                    if pos > 0:
                        decode_s += dt
                        steps += 1
    finally:
        model.on_routed = None
        model.force = None
        res.finish()
        res.close()
    out = res.report()
    out.update(decode_steps=steps, tokens_per_s=steps / decode_s if decode_s > 0 else 0.0, steps_fewer_threads=fewer[0])
    if guard is not None:
        out["steps_without_prefetch"] = guard.steps_off - off_before
    return out


def replay_sequences(trace, model, m):
    """[(token ids, experts [tokens, m, k], router inputs [tokens, m, width] or None)] of
    every sequence of a trace whose tokens all carry an id and routing; the trace must have
    the model's MoE shape."""
    ex = model.experts
    shape = (trace["n_moe_layers"], trace["n_experts"], trace["top_k"])
    if shape != (m, ex.n_experts, ex.top_k):
        raise LlamaCppError(f"the replayed trace is {shape[0]} MoE layers x {shape[1]} experts, top-{shape[2]}; "
                            f"{ex.path} is {m} x {ex.n_experts}, top-{ex.top_k}")
    out = []
    for s in np.unique(trace["seq"]):
        rows = np.flatnonzero(trace["seq"] == s)
        rows = rows[np.argsort(trace["pos"][rows], kind="stable")]
        tokens, experts = trace["token"][rows], trace["experts"][rows]
        inputs = trace["router_inputs"][rows] if "router_inputs" in trace else None
        ok = (tokens >= 0) & (tokens < model.n_vocab) & (experts < ex.n_experts).all(axis=(1, 2))
        if not ok.all():  # cut at the first token without an id or routing
            cut = int(np.argmin(ok))
            tokens, experts = tokens[:cut], experts[:cut]
            inputs = inputs[:cut] if inputs is not None else None
        if len(tokens) > 1:
            out.append(([int(t) for t in tokens], experts.astype(np.int32), inputs))
    return out
