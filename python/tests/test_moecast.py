"""The Python package against the Rust paths: a trace of the shipped model replayed
through moecast.Predictor gives exactly the next-token and lookahead F1 that
`moecast eval` reports for the same predictor and trace; read_trace returns the trace's
arrays; bad input raises MoecastError.

Needs the `moecast` binary (MOECAST_BIN, default target/debug/moecast) and
`pip install ./python`; `make test-python` does both.
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import moecast

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("MOECAST_BIN", str(ROOT / "target" / "debug" / "moecast"))


def run(*args):
    subprocess.run([BIN, *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short trace of the shipped tiny MoE, a small lookahead predictor trained on it,
    and `moecast eval`'s report of that predictor on that trace."""
    d = tmp_path_factory.mktemp("moecast")
    prompts = d / "prompts.txt"
    prompts.write_text(
        "Once upon a time there was a little robot\n"
        "def fibonacci(n):\n"
        "The theorem states that every bounded sequence\n"
        "In 1905 the physicist published\n"
    )
    trace = d / "t.mctrace"
    run("collect", "--model", ROOT / "checkpoints" / "tiny-moe", "--prompts", prompts,
        "--samples", "3", "--max-new-tokens", "40", "--temperature", "0.8", "-o", trace)
    out = d / "predictor"
    run("train", "--shards", "2", "--trace", trace, "--task", "lookahead", "--horizon", "2", "--d-model", "32",
        "--layers", "1", "--heads", "2", "--epochs", "2", "--batch-size", "4",
        "--val-fraction", "0.2", "--test-fraction", "0", "--quiet", "-o", out)
    report = d / "eval.json"
    run("eval", "--predictor", out, "--trace", trace, "--quiet", "--no-baselines",
        "--json", report)
    return trace, out, json.loads(report.read_text())


def test_replayed_f1_equals_moecast_eval(trained):
    trace, out, report = trained
    p = moecast.Predictor(out)
    t = moecast.read_trace(trace)
    m, k = p.n_moe_layers, p.top_k
    assert (m, k, p.horizon) == (t["n_moe_layers"], t["top_k"], 2)
    groups = report["groups"]
    hits = {g: 0 for g in groups}
    sets = {g: 0 for g in groups}
    s = p.session()
    for seq in np.unique(t["seq"]):
        s.reset()
        for i in np.flatnonzero(t["seq"] == seq):
            token, experts = int(t["token"][i]), t["experts"][i]
            top = s.predict_next(token)
            assert top.shape == (m, k) and top.dtype == np.uint16
            for layer in range(m):
                hits["next token"] += len(set(top[layer]) & set(experts[layer]))
                sets["next token"] += 1
            for known in range(1, m):
                ahead = s.predict_lookahead(token, experts[:known])
                assert ahead.shape == (p.horizon, k)
                for h in range(min(p.horizon, m - known)):
                    g = f"+{h + 1} layer"
                    hits[g] += len(set(ahead[h]) & set(experts[known + h]))
                    sets[g] += 1
            s.observe(token, experts)
    for gi, g in enumerate(groups):
        want = report["methods"][0]["groups"][gi]["overall"]
        assert sets[g] == want["sets"], g
        f1 = hits[g] / (k * sets[g])
        assert abs(f1 - want["f1"]) < 1e-6, (g, f1, want["f1"])


def test_read_trace_gives_the_trace_arrays(trained):
    trace, _, _ = trained
    t = moecast.read_trace(trace)
    n = len(t["seq"])
    assert t["experts"].shape == (n, t["n_moe_layers"], t["top_k"])
    assert t["experts"].dtype == np.uint16 and t["token"].dtype == np.uint32
    assert t["weights"].shape == t["experts"].shape
    assert len(t["seq_names"]) == 12 and n > 12 * 40
    assert (t["experts"] < t["n_experts"]).all()
    # Positions restart at every sequence.
    starts = np.flatnonzero(np.diff(t["seq"], prepend=-1))
    assert (t["pos"][starts] == 0).all()


def test_read_trace_gives_each_channel(tmp_path):
    """Channels recorded by `collect` come back as [tokens, layers, width] arrays."""
    trace = tmp_path / "c.parquet"
    run("collect", "--model", ROOT / "checkpoints" / "tiny-moe", "--token-ids", "5,17,42,99",
        "--max-new-tokens", "6", "--hidden-states", "--pre-attention-logits", "-o", trace)
    t = moecast.read_trace(trace)
    n, m, e = len(t["seq"]), t["n_moe_layers"], t["n_experts"]
    assert set(t["channels"]) == {"router_inputs", "pre_attention_logits"}
    assert t["pre_attention_logits"].shape == (n, m, e)
    assert t["router_inputs"].shape == (n, m, t["channels"]["router_inputs"])
    assert np.isfinite(t["pre_attention_logits"]).all() and np.abs(t["router_inputs"]).sum() > 0


def test_bad_input_raises_moecast_error(trained, tmp_path):
    _, out, _ = trained
    with pytest.raises(moecast.MoecastError, match="predictor.json"):
        moecast.Predictor(tmp_path)
    with pytest.raises(moecast.MoecastError):
        moecast.read_trace(tmp_path / "missing.mctrace")
    p = moecast.Predictor(out)
    s = p.session()
    with pytest.raises(moecast.MoecastError, match="budget"):
        s.predict_next(3, budget=p.n_experts + 1)
    bad = np.zeros((p.n_moe_layers, p.top_k), dtype=np.int64)
    bad[1, 0] = p.n_experts
    with pytest.raises(moecast.MoecastError, match="expert"):
        s.observe(3, bad)
    with pytest.raises(moecast.MoecastError, match="ids"):
        s.observe(3, bad[:2])
    with pytest.raises(moecast.MoecastError, match="token-dropout"):
        s.predict_next_unknown()


def test_blend_learns_the_routing_better_than_layer_frequency(trained):
    """moecast.Blend replayed over the trace: its next-layer forecasts hit more of the
    routed experts than each layer's most frequent ones; from a trace or the predictor's
    directory alike; bad input raises MoecastError."""
    trace, out, _ = trained
    t = moecast.read_trace(trace)
    b = moecast.Blend(trace)
    m, k = b.n_moe_layers, b.top_k
    assert (m, b.n_experts, k) == (t["n_moe_layers"], t["n_experts"], t["top_k"])
    assert b.horizon >= 1
    experts = t["experts"]
    counts = np.zeros((m, b.n_experts))
    for layer in range(m):
        np.add.at(counts[layer], experts[:, layer].reshape(-1), 1)
    frequent = np.argsort(-counts, axis=1, kind="stable")[:, :k]
    hits = {"blend": 0, "frequency": 0}
    total = 0
    for s in range(len(t["seq_names"])):
        b.reset()
        for i in np.flatnonzero(t["seq"] == s):
            routing = experts[i]
            for layer in range(m - 1):
                earlier = routing[layer - 1] if layer else None
                ids, probs = b.forecast(layer, routing[layer], earlier)
                assert ids.shape == (b.horizon, k) and probs.shape == (b.horizon, k)
                assert ((probs >= 0) & (probs <= 1)).all()
                hits["blend"] += len(set(ids[0]) & set(routing[layer + 1]))
                hits["frequency"] += len(set(frequent[layer + 1]) & set(routing[layer + 1]))
                total += k
            b.observe(t["token"][i], routing)
    assert hits["blend"] > hits["frequency"] * 1.2, (hits, total)
    from_dir = moecast.Blend(out)
    assert (from_dir.n_moe_layers, from_dir.top_k) == (m, k)
    with pytest.raises(moecast.MoecastError, match="expert 99"):
        b.forecast(0, [1, 99])
    with pytest.raises(moecast.MoecastError, match="layer"):
        b.forecast(m, [1, 2])
    with pytest.raises(moecast.MoecastError, match="layer -1"):
        b.forecast(-1, [1, 2])
    with pytest.raises(moecast.MoecastError, match="budget 0"):
        b.forecast(0, [1, 2], budget=0)
    with pytest.raises(moecast.MoecastError, match="token -3"):
        b.observe(-3, experts[0])
    with pytest.raises(moecast.MoecastError, match="nope"):
        moecast.Blend(out / "nope.mctrace")


def test_planner_stages_the_blends_forecasts_when_the_link_is_fast(trained):
    """moecast.Planner offered the blend's forecasts over the trace: with reads a third
    of a layer's time it stages experts the routing then uses, so fewer are read on
    demand than with reads a hundred layers long, when it stages none; bad input raises
    MoecastError."""
    trace, _, _ = trained
    t = moecast.read_trace(trace)

    def replay(read_us):
        b = moecast.Blend(trace)
        m, e, k = b.n_moe_layers, b.n_experts, b.top_k
        pl = moecast.Planner(m, e, k, m * e // 4, read_us=read_us, layer_us=1000.0)
        staged, demand, used = set(), 0, 0
        for s in range(len(t["seq_names"])):
            b.reset()
            for i in np.flatnonzero(t["seq"] == s):
                routing = t["experts"][i]
                pl.token_started()
                for layer in range(m):
                    ids = {layer * e + int(x) for x in routing[layer]}
                    demand += len(ids - staged)
                    used += len(ids & staged)
                    pl.layer_routed(layer, routing[layer], len(ids - staged))
                    staged = {x for x in staged if x // e != layer}
                    earlier = routing[layer - 1] if layer else None
                    forecast, probs = b.forecast(layer, routing[layer], earlier)
                    for row in range(b.horizon):
                        out = pl.plan((layer + 1 + row) % m, forecast[row], probs[row])
                        assert out.dtype == np.uint32 and (out < m * e).all()
                        staged |= {int(x) for x in out}
                b.observe(t["token"][i], routing)
        return demand, used, pl.report()

    fast, slow = replay(300.0), replay(100_000.0)
    assert fast[2]["staged"] > 0 and fast[1] > 0, fast
    assert (fast[2]["read_us"], fast[2]["layer_us"]) == (300.0, 1000.0)
    assert 0 < fast[2]["calibrated_probability"] < 1, fast
    assert slow[2]["staged"] == 0 and slow[1] == 0, slow
    assert fast[0] < slow[0], (fast, slow)
    with pytest.raises(moecast.MoecastError, match="top-9"):
        moecast.Planner(4, 8, 9, 8)
    with pytest.raises(moecast.MoecastError, match="timings"):
        moecast.Planner(4, 8, 2, 8, read_us=100.0)
    pl = moecast.Planner(4, 8, 2, 8)
    pl.token_started()
    with pytest.raises(moecast.MoecastError, match="layer 4"):
        pl.plan(4, [1, 2])
    with pytest.raises(moecast.MoecastError, match="probs holds 1"):
        pl.plan(1, [1, 2], [0.5])
    with pytest.raises(moecast.MoecastError, match="expert 9"):
        pl.layer_routed(0, [9, 1], 2)
    with pytest.raises(moecast.MoecastError, match="not a duration"):
        pl.read_done(-1)
    with pytest.raises(moecast.MoecastError, match="issue time"):
        pl.read_issued(float("nan"))
    with pytest.raises(moecast.MoecastError, match="expert id 32"):
        pl.evicted(32)
    pl.evicted(31)


def test_prefetch_guard_keeps_the_faster_setting():
    """The guard measures decode steps in windows: prefetch that makes steps slower is
    turned off (and still measured now and then), prefetch that makes them faster stays."""

    def run(on_s, off_s, steps=480):
        g = moecast.PrefetchGuard(window=8, explore_every=6)
        on = 0
        windows = []
        for _ in range(steps):
            enabled = g.enabled
            on += enabled
            w = g.step_done(on_s if enabled else off_s)
            if w is not None:
                windows.append(w)
        return on, g.steps_off, windows

    on, off, windows = run(0.12, 0.10)
    assert on + off == 480 and on < 120, (on, off)
    assert {w[0] for w in windows} == {True, False}, "both settings are measured"
    assert all(abs(s - (0.12 if p else 0.10)) < 1e-12 for p, s in windows)
    on, off, _ = run(0.08, 0.10)
    assert on > 360, on
    with pytest.raises(moecast.MoecastError, match="at least 1"):
        moecast.PrefetchGuard(window=0)
    with pytest.raises(moecast.MoecastError, match="not a duration"):
        moecast.PrefetchGuard().step_done(float("nan"))


def test_forecasts_run_on_another_thread_with_the_gil_released(trained):
    """A session made on the main thread forecasts on a worker thread, giving what it
    gives on the main thread, and while it forecasts the main thread runs Python: with a
    switch interval far longer than the test, the main thread gets the GIL back only if
    a forecast releases it, so it stops the worker after a few forecasts; holding the
    GIL, the worker would run all of its forecasts first."""
    import sys
    import threading
    import time

    trace, out, _ = trained
    t = moecast.read_trace(trace)
    p = moecast.Predictor(out)
    tokens, routing = t["token"][:24], t["experts"][:24]

    def forecasts(s):
        s.reset()
        rows = []
        for tok, experts in zip(tokens, routing):
            rows.append(s.predict_next(tok))
            rows.append(s.predict_lookahead(tok, experts[:1]))
            s.observe(tok, experts)
        return rows

    here = forecasts(p.session())
    there, errors = [], []
    s = p.session()
    worker = threading.Thread(target=lambda: there.extend(forecasts(s)))
    worker.start()
    worker.join()
    assert len(there) == len(here) and all((a == b).all() for a, b in zip(here, there))

    bound, stop, calls = 20_000, threading.Event(), [0]

    def spin():
        try:
            s.reset()
            while calls[0] < bound and not stop.is_set():
                s.predict_next(int(tokens[calls[0] % len(tokens)]))
                calls[0] += 1
        except BaseException as e:
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        worker = threading.Thread(target=spin)
        worker.start()
        while calls[0] == 0 and worker.is_alive():
            time.sleep(0.001)  # lets go of the GIL; taken back once the worker lets go
        stop.set()
        worker.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    assert 1 <= calls[0] < bound, f"the main thread ran only after {calls[0]} forecasts"


def test_next_use_eviction_hits_as_moecast_simulate_and_beyond_lru(trained, tmp_path):
    """A cache of 10% of the shipped model's experts, replaying its trace on demand and
    evicting the resident expert moecast.NextUse expects latest (re-keying a layer's
    experts at each of its visits, as `moecast simulate`'s cache does), hits as often as
    `moecast simulate --policy next-use` on the same trace (within 0.2 points: ties may
    break otherwise), and far more often than LRU, which a cache smaller than a token's
    experts leaves with almost nothing."""
    trace, _, _ = trained
    t = moecast.read_trace(trace)
    m, e = t["n_moe_layers"], t["n_experts"]
    capacity = m * e // 10

    def replay(policy):
        nu = moecast.NextUse(m, e)
        key, clock, hits, uses = {}, 0, 0, 0
        for row in t["experts"]:
            for layer, experts in enumerate(row):
                used = [(layer, int(x)) for x in experts if x != 0xFFFF]
                if not used:  # a layer not computed
                    continue
                nu.layer_routed(layer, np.array([x for _, x in used], dtype=np.uint16))
                due = nu.layer(layer)
                for k in key:
                    if k[0] == layer and policy == "next-use":
                        key[k] = -due[k[1]]
                for k in used:
                    uses += 1
                    hits += k in key
                    clock += 1
                    key[k] = -due[k[1]] if policy == "next-use" else clock
                    while len(key) > capacity:
                        victim = min((x for x in key if x not in used), key=key.__getitem__)
                        del key[victim]
        return hits / uses

    report = tmp_path / "sim.json"
    run("simulate", "--trace", trace, "--cache", capacity, "--policy", "next-use", "--prefetch", "none",
        "--json", report)
    simulated = json.loads(report.read_text())[0]["hit_rate"]
    next_use, lru = replay("next-use"), replay("lru")
    print(f"hit rates: next-use {next_use:.4f} (moecast simulate {simulated:.4f}), lru {lru:.4f}")
    assert abs(next_use - simulated) < 0.002, (next_use, simulated)
    assert next_use > lru + 0.1, (next_use, lru)
    with pytest.raises(moecast.MoecastError, match=f"expert {e} is outside 0..{e}"):
        moecast.NextUse(m, e).layer_routed(0, [e])
    with pytest.raises(moecast.MoecastError, match=f"MoE layer {m} is outside"):
        moecast.NextUse(m, e).layer(m)
    with pytest.raises(moecast.MoecastError, match="at least 1"):
        moecast.NextUse(0, e)
