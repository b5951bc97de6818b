"""moecast with llama.cpp (llama-cpp-python): the shipped model exported to GGUF loads in
llama.cpp, tokenizes like moecast, routes like `moecast collect` on the same token ids,
its routing collected from llama.cpp trains a predictor, and that predictor's staging
raises the share of experts resident when llama.cpp uses them.

Needs llama-cpp-python, gguf, numpy, moecast's Python package and the `moecast` binary
(MOECAST_BIN, default target/debug/moecast); `make test-llamacpp` provides them all.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "llamacpp"))
BIN = os.environ.get("MOECAST_BIN", str(ROOT / "target" / "debug" / "moecast"))
MODEL = ROOT / "checkpoints" / "tiny-moe"
HELDOUT = ROOT / "prompts" / "heldout.txt"

import export_gguf  # noqa: E402
import moecast_llamacpp as mcl  # noqa: E402
import parity  # noqa: E402


def run(*args):
    return subprocess.run([BIN, *map(str, args)], check=True, capture_output=True, text=True).stdout


def tool(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "llamacpp" / script), *map(str, args)],
                          check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def work():
    # Beside the clone rather than in the temporary directory: residency is read from the
    # page cache, which a tmpfs /tmp would not let go of.
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs", prefix="test-llamacpp-") as tmp:
        yield from _work(Path(tmp))


def _work(d):
    for dtype in ("f32", "f16"):
        export_gguf.export(str(MODEL), str(d / f"tiny.{dtype}.gguf"), dtype)
    # moecast's own routing of the held-out prompts, greedy
    run("collect", "--model", MODEL, "--prompts", HELDOUT, "--max-new-tokens", "32", "--hidden-states",
        "-o", d / "ref.jsonl")
    parity.prompts_from_trace(str(d / "ref.jsonl"), str(d / "ref-ids.jsonl"))
    yield d


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("norm_topk_prob", None),  # transformers' default is false: llama.cpp would renormalise
    ("hidden_act", "gelu"),
])
def test_export_refuses_fields_llama_cpp_would_compute_differently(tmp_path, field, value):
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in MODEL.iterdir():
        (ck / f.name).symlink_to(f)
    cfg = json.loads((MODEL / "config.json").read_text())
    if value is None:
        del cfg[field]
    else:
        cfg[field] = value
    (ck / "config.json").unlink()
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(export_gguf.ExportError, match=field):
        export_gguf.export(str(ck), str(tmp_path / "x.gguf"))
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()


def test_tokenizer_matches_moecast(work):
    """The GGUF's tokenizer (llama.cpp's BPE) gives the prompt ids moecast's tokenizer gave."""
    _, ref = parity.read_jsonl(str(work / "ref.jsonl"))
    prompt_ids = {}
    for r in ref:
        if r["phase"] == "prefill":
            prompt_ids.setdefault(r["seq"], []).append(r["token"])
    model = mcl.LlamaCppModel(str(work / "tiny.f32.gguf"))
    try:
        ours = mcl.read_prompts(str(HELDOUT), model)
    finally:
        model.close()
    assert len(ours) == len(prompt_ids)
    for (name, ids), (ref_name, ref_ids) in zip(ours, prompt_ids.items()):
        assert ids == ref_ids, f"prompt {ref_name}: llama.cpp {ids} vs moecast {ref_ids}"


@pytest.mark.parametrize("dtype,floor", [("f32", 0.99), ("f16", 0.90)])
def test_routing_parity_with_moecast_collect(work, dtype, floor):
    """On the same token ids, llama.cpp's top-k sets equal moecast collect's."""
    out = work / f"llama.{dtype}.jsonl"
    tool("moecast_llamacpp.py", "collect", "--model", work / f"tiny.{dtype}.gguf",
         "--prompts", work / "ref-ids.jsonl", "--max-new-tokens", "0", "--router-inputs", "--quiet", "-o", out)
    meta, _ = parity.read_jsonl(str(out))
    assert meta["source"] == "llama.cpp" and meta["top_k"] == 2 and meta["n_experts"] == 16
    c = parity.compare(str(work / "ref.jsonl"), str(out))
    share = c["same_set"] / c["cells"]
    print(f"\nparity {dtype}: {c['same_set']}/{c['cells']} top-k sets equal ({100 * share:.2f}%), "
          f"{c['same_order']} in the same order, router inputs within {c['router_input_rel_err']:.1e}")
    _, ref = parity.read_jsonl(str(work / "ref.jsonl"))
    assert c["cells"] == sum(sum(e is not None for e in r["experts"]) for r in ref)
    assert share >= floor
    assert c["router_input_rel_err"] < 5e-3  # the reference stores router inputs in 16 bits


def test_parity_refuses_traces_with_nothing_in_common(work, tmp_path):
    renamed = tmp_path / "renamed.jsonl"
    lines = (work / "ref.jsonl").read_text().splitlines()
    out = [lines[0]] + [json.dumps(dict(json.loads(l), seq="x" + json.loads(l)["seq"])) for l in lines[1:]]
    renamed.write_text("\n".join(out) + "\n")
    with pytest.raises(ValueError, match="share no routed"):
        parity.compare(str(work / "ref.jsonl"), str(renamed))


def test_prefetch_refuses_bad_settings(work, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text('{"token_ids": [5]}\n')
    for args, message in (
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--resident", "1"], "cannot hold one layer's top-2"),
        (["--budget", "auto,0"], "'0' is neither auto nor a number"),
        (["--budget", "2,2"], "names a budget twice"),
        (["--read-us", "100"], "--read-us and --layer-us go together"),
        (["--read-us", "100", "--layer-us", "-1"], "must be above 0"),
        (["--threads", "1,2"], "--threads '1,2': give N or N,M"),
    ):
        p = subprocess.run([sys.executable, str(ROOT / "llamacpp" / "moecast_llamacpp.py"), "prefetch",
                            "--model", str(work / "tiny.f32.gguf"), "--prompts", str(one), *args],
                           capture_output=True, text=True)
        assert p.returncode == 1 and message in p.stderr, (args, p.stderr)


def test_collect_names_the_bad_prompt(work, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"token_ids": [1, 2, 3]}\n{"token_ids": [1, 999999]}\n')
    p = subprocess.run([sys.executable, str(ROOT / "llamacpp" / "moecast_llamacpp.py"), "collect",
                        "--model", str(work / "tiny.f32.gguf"), "--prompts", str(bad), "-o",
                        str(tmp_path / "o.jsonl")], capture_output=True, text=True)
    assert p.returncode == 1
    assert "bad.jsonl:2" in p.stderr and "999999" in p.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_predictor_from_llama_cpp_routing_stages_experts(work):
    """Collect from llama.cpp, convert, train, then decode with a quarter of the experts
    resident: the predictor's staging (a fixed budget, and the planner's) must raise the
    share resident when used."""
    trace = work / "train.jsonl"
    tool("moecast_llamacpp.py", "collect", "--model", work / "tiny.f32.gguf", "--prompts",
         ROOT / "prompts" / "demo.txt", "--samples", "3", "--max-new-tokens", "48",
         "--temperature", "0.8", "--quiet", "-o", trace)
    run("trace", "convert", trace, "-o", work / "train.mctrace")
    run("train", "--shards", "2", "--trace", work / "train.mctrace", "--task", "lookahead", "--horizon", "2",
        "--epochs", "3", "--batch-size", "4", "--test-fraction", "0", "--quiet", "-o", work / "predictor")
    report = work / "prefetch.json"
    out = tool("moecast_llamacpp.py", "prefetch", "--model", work / "tiny.f32.gguf", "--prompts", HELDOUT,
               "--predictor", work / "predictor", "--resident", "25%", "--max-new-tokens", "24",
               "--json", report)
    print("\n" + out)
    modes = json.loads(report.read_text())["modes"]
    base, pred, planned = modes["on-demand"], modes["budget-1"], modes["planned"]

    def covered(mode):  # the share of uses whose expert was resident or its read issued ahead
        return mode["resident_when_used"] + mode["late_staged"]

    assert base["decode_steps"] == pred["decode_steps"] == planned["decode_steps"] > 0
    assert base["bytes_staged"] == 0 and pred["bytes_staged"] > 0
    # whether a staged read lands before its use is the machine's speed (resident when
    # used rose 8-14 points in clean-clone runs, 8 where on demand ran at half its usual
    # tokens/s); that it was staged at all is the forecast's: uses found resident or
    # staged (landed or late) are what the harness decides
    assert covered(pred) > covered(base) + 0.10 and pred["resident_when_used"] >= base["resident_when_used"]
    assert pred["bytes_demand"] < base["bytes_demand"]
    # the planner measured the reads and the layers and judged every forecast offered
    assert planned["planner_read_us"] > 0 and planned["planner_layer_us"] > 0
    assert planned["planner_offered"] >= planned["planner_staged"] + planned["planner_late"] > 0
    # planned with stated timings: reads that take a second land after their layer and
    # are never staged, so decoding reads what demand paging reads; reads of 10 us
    # under layers of 1 ms pay, and staging raises residency as the fixed budget does;
    # with --threads 2,1 every planned step (no guard) runs on 1 llama.cpp thread
    for read_us, staged in (("1000000", False), ("10", True)):
        tool("moecast_llamacpp.py", "prefetch", "--model", work / "tiny.f32.gguf", "--prompts", HELDOUT,
             "--predictor", work / "predictor", "--resident", "25%", "--max-new-tokens", "24", "--budget", "auto",
             "--read-us", read_us, "--layer-us", "1000", "--no-guard", "--threads", "2,1", "--json", report)
        figures = json.loads(report.read_text())
        modes = figures["modes"]
        base, planned = modes["on-demand"], modes["planned"]
        assert planned["planner_read_us"] == float(read_us) and planned["planner_layer_us"] == 1000
        assert base["steps_fewer_threads"] == 0 and planned["steps_fewer_threads"] == planned["decode_steps"] > 0
        if staged:
            assert planned["bytes_staged"] > 0 and planned["planner_staged"] > 0
            assert covered(planned) > covered(base) + 0.10
            assert planned["bytes_demand"] < base["bytes_demand"]
        else:
            assert planned["bytes_staged"] == 0 and planned["planner_staged"] == 0
            assert planned["planner_late"] > 0
            # the same reads, but residency is the page cache's word, which the harness does
            # not control: one clean-clone run counted one expert fewer read on demand
            assert abs(planned["bytes_demand"] - base["bytes_demand"]) <= figures["expert_bytes"]
    # the same through a replayed trace: llama.cpp's own routing forced back onto it;
    # in two rounds, the second running the modes in reverse, each round's ratio kept
    p = subprocess.run([sys.executable, str(ROOT / "llamacpp" / "moecast_llamacpp.py"), "prefetch", "--model",
                        str(work / "tiny.f32.gguf"), "--replay", str(work / "train.mctrace"), "--replay-tokens", "150",
                        "--predictor", str(work / "predictor"), "--resident", "25%", "--rounds", "2", "--json",
                        str(report)], check=True, capture_output=True, text=True)
    runs = [l.split() for l in p.stderr.splitlines() if l.startswith("round ")]
    order = [r[2].rstrip(":") for r in runs]
    assert order == ["on-demand", "planned", "budget-1", "budget-1", "planned", "on-demand"], p.stderr
    modes = json.loads(report.read_text())["modes"]
    for r in runs:  # each round's figure is kept at its round, whatever order it ran in
        assert abs(modes[r[2].rstrip(":")]["tokens_per_s_rounds"][int(r[1].split("/")[0]) - 1] - float(r[3])) <= 0.051
    assert modes["on-demand"]["decode_steps"] == modes["budget-1"]["decode_steps"] == 150
    print("replayed, covered:", covered(modes["budget-1"]), covered(modes["on-demand"]))
    assert covered(modes["budget-1"]) > covered(modes["on-demand"]) + 0.10
    ratios = modes["budget-1"]["vs_on_demand_rounds"]
    assert modes["on-demand"]["vs_on_demand_rounds"] == [1.0, 1.0] and len(ratios) == 2
    assert ratios == [t / b for t, b in zip(modes["budget-1"]["tokens_per_s_rounds"],
                                            modes["on-demand"]["tokens_per_s_rounds"])]
    row = next(l.split() for l in p.stdout.splitlines() if l.startswith("budget-1 "))
    assert row[-1] == f"{min(ratios):.2f}-{max(ratios):.2f}x", p.stdout
    # a one-token prompt is a prompt (its batch has one row), not a decode step
    one = work / "one.jsonl"
    one.write_text('{"token_ids": [5]}\n')
    tool("moecast_llamacpp.py", "prefetch", "--model", work / "tiny.f32.gguf", "--prompts", one,
         "--predictor", work / "predictor", "--max-new-tokens", "8", "--json", report)
    assert 1 <= json.loads(report.read_text())["modes"]["budget-1"]["decode_steps"] <= 7
    p = subprocess.run([sys.executable, str(ROOT / "llamacpp" / "moecast_llamacpp.py"), "prefetch", "--model",
                        str(work / "tiny.f32.gguf"), "--prompts", str(one), "--predictor", str(work / "predictor"),
                        "--resident", "2"], capture_output=True, text=True)
    assert p.returncode == 1 and "no room to stage" in p.stderr, p.stderr


def test_one_guard_measures_over_calls(work):
    """A prefetch guard handed to decode_with_residency is the one that decides: kept over
    calls (the harness's rounds, a runtime's requests), it counts every call's steps
    without prefetch, and each call reports its own."""
    if not (work / "predictor").exists():
        pytest.skip("needs the predictor trained by test_predictor_from_llama_cpp_routing_stages_experts")
    import moecast
    from expert_residency import decode_with_residency

    model = mcl.LlamaCppModel(str(work / "tiny.f32.gguf"))
    predictor, guard = moecast.Predictor(work / "predictor"), moecast.PrefetchGuard(window=2, explore_every=1)
    try:
        prompts = mcl.read_prompts(str(HELDOUT), model)
        total = len(model.experts.moe_layers) * model.experts.n_experts
        outs = [decode_with_residency(model, prompts, total // 4, 24, predictor, "auto", guard=guard)
                for _ in range(2)]
    finally:
        model.close()
    assert all(o["steps_without_prefetch"] > 0 for o in outs), outs
    assert guard.steps_off == sum(o["steps_without_prefetch"] for o in outs)


def test_forced_routing_is_what_llama_cpp_computes(work):
    """Replay forces each layer's top-k through the eval callback: llama.cpp's weights are
    the router's renormalised probabilities of the forced experts, and the output moves."""
    model = mcl.LlamaCppModel(str(work / "tiny.f32.gguf"), router_logits=True)
    try:
        tokens = [432, 17, 99, 5, 260]
        free = model.decode(tokens, 0, all_logits=True)
        free_logits = model.last_logits()
        rng = np.random.default_rng(0)
        forced = [np.stack([rng.choice(16, 2, replace=False) for _ in tokens]) for _ in range(6)]
        model.force = lambda i, n: forced[i][:n]
        model.clear()
        out = model.decode(tokens, 0, all_logits=True)
        forced_logits = model.last_logits()
        model.force = None
    finally:
        model.close()
    for i in range(6):
        assert (out["topk"][i] == forced[i]).all()
        logits = out["logits"][i]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        chosen = np.take_along_axis(p, forced[i], axis=1)
        np.testing.assert_allclose(out["weights"][i], chosen / chosen.sum(axis=1, keepdims=True), rtol=1e-4)
    assert not (free["topk"][5] == forced[5]).all()
    assert not np.allclose(free_logits, forced_logits, atol=1e-3)


def _c_harness(work, *flags):
    """Runs the C harness on the tiny model's held-out prompts at 10% resident, 24 tokens,
    one round; {mode: {column: value}}."""
    out = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-r", "10", "-n", "24", "-R", "1", *flags,
                          str(work / "tiny.f32.gguf"), str(HELDOUT), str(work / "predictor")],
                         check=True, capture_output=True, text=True).stdout
    print("\n" + out)
    cols = ["resident", "demand", "staged", "wasted", "stall", "tokens_per_s"]
    return {l.split()[0]: dict(zip(cols, (float(x.rstrip("%")) for x in l.split()[1:7])))
            for l in out.splitlines() if l.startswith(("on-demand", "budget-", "planned ", "oracle "))}


@pytest.mark.skipif(not os.environ.get("MOECAST_PREFETCH_C"), reason="make test-llamacpp builds the C harness")
def test_c_harness_stages_from_the_c_abi(work):
    """llamacpp/moecast_prefetch.c: llama.cpp and libmoecast from C, no Python in the
    callback; the predictor (trained by the test above) must raise residency there too,
    with a fixed budget and with the C ABI's planner, forecasting in the callback (the
    default) and on a prefetcher thread (-a). There the callback waits for each forecast
    (-w): on a machine where llama.cpp decodes faster than the thread forecasts, the
    harness drops the forecasts that would land late, and this test is about what the C
    ABI stages. The planner plans with stated timings and no guard, forecasting on the
    prefetcher's thread and waiting for each (-a -w), so what it stages does not depend on
    the machine's speed either: in a read's shadow (the default) a layer forecasts only
    when it misses, which follows the landing times."""
    if not (work / "predictor").exists():
        pytest.skip("needs the predictor trained by test_predictor_from_llama_cpp_routing_stages_experts")
    for flags in ((), ("-a", "-w")):
        modes = _c_harness(work, "-b", "1", *flags)
        base, budget = modes["on-demand"], modes["budget-1"]
        assert budget["resident"] > base["resident"] and budget["demand"] < 0.9 * base["demand"], flags
    # reads of a second land after their layer: the planner stages nothing, and planned
    # decoding reads what demand paging reads; reads of 10 us pay, and it stages
    expert_mb = 3 * 128 * 128 * 4 / 1e6  # one f32 expert of the tiny model (gate, up, down: 128 x 128)
    slow = _c_harness(work, "-b", "auto", "-t", "1000000,1000", "-G", "-a", "-w")
    assert slow["planned"]["staged"] == 0
    # the same reads; residency is the page cache's word (one expert's bytes of leeway)
    assert abs(slow["planned"]["demand"] - slow["on-demand"]["demand"]) <= expert_mb + 0.005
    fast = _c_harness(work, "-b", "auto", "-t", "10,1000", "-G", "-a", "-w")
    base, planned = fast["on-demand"], fast["planned"]
    assert planned["staged"] > 0 and planned["resident"] > base["resident"] + 10
    assert planned["demand"] < base["demand"]


@pytest.mark.skipif(not os.environ.get("MOECAST_PREFETCH_C"), reason="make test-llamacpp builds the C harness")
def test_c_harness_offers_no_forecast_that_lands_late(work):
    """With -a a forecast runs on the prefetcher thread and may land after its step or its
    layer has moved on; offered then, the planner would take it for the next token's
    lookup. Held 2 s before it is offered (-d 2000; a step of the tiny model takes a few
    ms, and no more than two forecasts wait), every forecast lands late and none is offered, where the same run without the
    hold offers thousands (about 3,000 here; the test asks for more than 300)."""
    if not (work / "predictor").exists():
        pytest.skip("needs the predictor trained by test_predictor_from_llama_cpp_routing_stages_experts")

    def offered(*flags):
        out = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-r", "10", "-n", "24", "-R", "1", "-b", "auto", "-t",
                              "10,1000", "-G", "-a", *flags, str(work / "tiny.f32.gguf"), str(HELDOUT),
                              str(work / "predictor")], check=True, capture_output=True, text=True).stdout
        print("\n" + out)
        return int(re.search(r"offered (\d+),", out).group(1))

    assert offered() > 300
    assert offered("-d", "2000") == 0
    run = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-d", "200", "missing.gguf", str(HELDOUT)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "-d: delays the prefetcher thread's forecasts" in run.stderr, run.stderr


@pytest.mark.skipif(not os.environ.get("MOECAST_PREFETCH_C"), reason="make test-llamacpp builds the C harness")
def test_c_harness_forecasts_on_fewer_threads(work):
    """-a -j 2,1: forecasts on a prefetcher thread, llama.cpp on 2 threads and on 1 in
    the steps that forecast (its threads wait for each other at every operation, so a
    forecast or a staged read taking one of 2 cores stalls both). Without the guard every
    step of planned and of the fixed budget forecasts, and none on demand; with it (over
    two rounds), exactly the steps it runs without prefetch get both threads back.
    Forecasting in the callback (no -a), llama.cpp keeps every core by default."""
    if not (work / "predictor").exists():
        pytest.skip("needs the predictor trained by test_predictor_from_llama_cpp_routing_stages_experts")

    def threads_per_mode(*flags):
        out = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-r", "10", "-n", "24", "-R", "1", *flags,
                              str(work / "tiny.f32.gguf"), str(HELDOUT), str(work / "predictor")],
                             check=True, capture_output=True, text=True).stdout
        print("\n" + out)
        assert "llama.cpp threads 2 (1 while forecasting)" in out
        line = next(l for l in out.splitlines() if l.startswith("steps with 1 llama.cpp thread"))
        counts = {m: (int(a), int(b)) for m, a, b in re.findall(r"(\S+) (\d+) of (\d+)", line.split(":", 1)[1])}
        off = re.search(r"(\d+) of (\d+) steps without prefetch", out)
        return counts, int(off.group(1))

    counts, _ = threads_per_mode("-a", "-j", "2,1", "-b", "auto,1", "-t", "10,1000", "-G")
    assert counts["on-demand"][0] == 0 and counts["on-demand"][1] > 50
    assert counts["planned"][0] == counts["planned"][1] and counts["budget-1"][0] == counts["budget-1"][1]
    counts, off = threads_per_mode("-a", "-j", "2,1", "-b", "auto", "-R", "2")
    assert counts["planned"][0] + off == counts["planned"][1] > 100
    out = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-r", "10", "-n", "24", "-R", "1", "-b", "auto", "-G",
                          str(work / "tiny.f32.gguf"), str(HELDOUT), str(work / "predictor")],
                         check=True, capture_output=True, text=True).stdout
    n = os.sysconf("SC_NPROCESSORS_ONLN")
    assert f"llama.cpp threads {n} ({n} while forecasting), forecasts on the decode thread during reads" in out


def test_c_harness_refuses_bad_arguments():
    """Bad options are refused by name before anything is loaded."""
    if not os.environ.get("MOECAST_PREFETCH_C"):
        pytest.skip("make test-llamacpp builds the C harness")
    for flags, message in ((["-t", "10"], "-t: takes READ_US,LAYER_US"), (["-b", "auto,x"], "-b: takes a comma list"),
                           (["-r", "0"], "-r in (0, 100]"), (["-j", "1,2"], "-j: takes THREADS"),
                           (["-w"], "-w: waits for the prefetcher thread's forecasts"),
                           (["-b", "auto,oracle"], "-b: `oracle` forecasts from a replayed trace: give -p TRACE"),
                           (["-W", "8"], "-W: takes the steps"), (["-p", "t.mctrace", "-W", "0"], "-W: takes the steps")):
        run = subprocess.run([os.environ["MOECAST_PREFETCH_C"], *flags, "missing.gguf", str(HELDOUT), "pred"],
                             capture_output=True, text=True)
        assert run.returncode != 0 and message in run.stderr, (flags, run.stderr)


@pytest.mark.skipif(not os.environ.get("MOECAST_PREFETCH_C"), reason="make test-llamacpp builds the C harness")
def test_c_harness_replays_a_trace_with_its_experts_forced(work, tmp_path):
    """-p TRACE decodes the trace's sequences token by token with every layer's experts
    forced to the recorded ones: a trace that routes every token to experts 0 and 1 of
    each layer needs 12 experts, which a 25% resident set (24) keeps, so after each
    sequence's first token (not counted) every routed expert is resident when used and
    nothing is read on demand; the model's own routing would read far more."""
    trace = tmp_path / "two-experts.jsonl"
    meta = {"model": "tiny-moe", "architecture": "qwen3moe", "n_layers": 6, "moe_layers": list(range(6)),
            "n_experts": 16, "top_k": 2, "n_shared_experts": 0, "source": "test", "ranked": True}
    rows = [{"seq": f"s{s}", "pos": p, "phase": "decode", "token": 100 + 7 * p + s, "experts": [[0, 1]] * 6}
            for s in range(2) for p in range(12)]
    trace.write_text("\n".join(json.dumps(r) for r in [{"meta": meta}, *rows]) + "\n")
    out = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-p", str(trace), "-r", "25", "-R", "1",
                          str(work / "tiny.f32.gguf")], check=True, capture_output=True, text=True).stdout
    print("\n" + out)
    row = next(l.split() for l in out.splitlines() if l.startswith("on-demand"))
    assert "2 sequences" in out and row[1] == "100.0%" and float(row[2]) == 0.0
    free = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-r", "25", "-R", "1", "-n", "12",
                           str(work / "tiny.f32.gguf"), str(HELDOUT)], check=True, capture_output=True, text=True).stdout
    assert float(next(l.split() for l in free.splitlines() if l.startswith("on-demand"))[2]) > 10
    bad = tmp_path / "other-shape.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in [{"meta": {**meta, "n_experts": 8}},
                                                    {**rows[0], "experts": [[0, 1]] * 6}]) + "\n")
    run = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-p", str(bad), str(work / "tiny.f32.gguf")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "other-shape.jsonl" in run.stderr and "differ from the model's" in run.stderr


@pytest.mark.skipif(not os.environ.get("MOECAST_PREFETCH_C"), reason="make test-llamacpp builds the C harness")
def test_c_harness_oracle_stages_the_replayed_experts(work):
    """-b oracle (with -p) plans as `auto` does from the replayed trace's own experts, no
    predictor needed: with reads stated fast (10 us against 1 ms layers) and no guard it
    stages most routed experts ahead of use, where on demand a 10% resident set (10
    experts, fewer than a token's 12) holds none of them. The planner's staging limit
    (keeping an entry alive a token where demand paging would) must not take the misses
    that staging saved as demand paging's own: it held a sure forecast to one read a
    lookup, and half of on demand's reads stayed (now 2%). Forecasts run on the
    prefetcher's thread and each is waited for (-a -w): in a read's shadow (the default) a
    layer forecasts only when it misses, so what is staged would follow the landing times
    (12% of on demand's reads stayed there, run to run apart). Stated slow (1 s) no read
    pays and it reads what on demand reads."""
    def modes(*flags):
        out = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-p", str(work / "ref.jsonl"), "-N", "120", "-r", "10",
                              "-b", "auto,oracle", "-G", *flags, str(work / "tiny.f32.gguf")],
                             check=True, capture_output=True, text=True).stdout
        print("\n" + out)
        rows = {l.split()[0]: l.split() for l in out.splitlines() if l.startswith(("on-demand", "oracle "))}
        assert set(rows) == {"on-demand", "oracle"}, "auto needs a predictor: without one only the oracle forecasts"
        assert "oracle's gain over on demand" in out
        return {m: {"resident": float(r[1].rstrip("%")), "demand": float(r[2]), "staged": float(r[3])}
                for m, r in rows.items()}

    fast = modes("-t", "10,1000", "-R", "2", "-a", "-w")
    base, oracle = fast["on-demand"], fast["oracle"]
    assert base["resident"] < 10 and oracle["resident"] > base["resident"] + 30
    assert oracle["demand"] < 0.4 * base["demand"] and oracle["staged"] > 0.6 * base["demand"]
    slow = modes("-t", "1000000,1000", "-R", "1")
    assert slow["oracle"]["staged"] == 0 and slow["oracle"]["demand"] == slow["on-demand"]["demand"]


@pytest.mark.skipif(not os.environ.get("MOECAST_PREFETCH_C"), reason="make test-llamacpp builds the C harness")
def test_c_harness_modes_take_turns_over_the_same_steps(work):
    """-W: the modes decode each window of the replayed trace in turn, each with its own
    resident set put back in the page cache first. On demand then reads exactly what it
    reads decoding the round alone: had the oracle's staged experts stayed in the page
    cache, on demand would find them resident and read less. Forecasting on the
    prefetcher's thread and waiting for each (-a -w), the oracle's decisions do not hang
    on when reads land, so it stages and reads on demand exactly what it does alone, which
    it would not were another mode's experts left in the page cache or its own not put back.
    (Forecasting in a read's shadow, the default, forecasts only at layers that miss, so
    what it stages follows the landing times and differs run to run.) The windows'
    seconds, pooled, give the round's ratio over on demand, and their bootstrap's
    interval holds it."""
    def modes(*flags):
        out = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-p", str(work / "ref.jsonl"), "-N", "96", "-r", "10",
                              "-b", "oracle", "-G", "-t", "10,1000", "-R", "1", "-a", "-w", *flags,
                              str(work / "tiny.f32.gguf")],
                             check=True, capture_output=True, text=True).stdout
        print("\n" + out)
        rows = {l.split()[0]: l.split() for l in out.splitlines() if l.startswith(("on-demand", "oracle "))}
        return out, {m: {"resident": float(r[1].rstrip("%")), "demand": float(r[2]), "staged": float(r[3]),
                         "ratio": float(r[7].rstrip("x"))} for m, r in rows.items()}

    _, alone = modes()
    out, turns = modes("-W", "5")
    assert "taking turns every 5 steps" in out
    expert_mb = 3 * 128 * 128 * 4 / 1e6  # one f32 expert of the tiny model (gate, up, down: 128 x 128)
    assert abs(turns["on-demand"]["demand"] - alone["on-demand"]["demand"]) <= expert_mb + 0.005
    assert abs(turns["on-demand"]["resident"] - alone["on-demand"]["resident"]) < 1
    assert turns["oracle"]["resident"] > turns["on-demand"]["resident"] + 30
    for what in ("staged", "demand"):
        assert abs(turns["oracle"][what] - alone["oracle"][what]) <= 0.005, what
    assert turns["oracle"]["demand"] < 0.5 * turns["on-demand"]["demand"]
    line = next(l for l in out.splitlines() if l.startswith("paired windows"))
    windows, point, lo, hi = map(float, re.search(r"paired windows \((\d+)\).* oracle ([\d.]+)x \(([\d.]+)-([\d.]+)x\)",
                                                  line).groups())
    assert windows >= 96 // 5 and abs(point - turns["oracle"]["ratio"]) <= 0.011 and lo <= point <= hi


@pytest.mark.skipif(not os.environ.get("MOECAST_PREFETCH_C"), reason="make test-llamacpp builds the C harness")
def test_a_hidden_state_predictor_gets_the_router_inputs(work, tmp_path):
    """A predictor trained with --features hidden reads the routed layer's router input
    beside its routing. Decoding prompts, the C harness copies llama.cpp's ffn_norm-L (the
    router's input) for it; replaying (-p, and the Python harness's --replay), the trace's
    recorded one, since the replayed model's own would not match the forced routing.
    Forecasting on a prefetcher thread and waiting for each (-a -w), a fixed budget stages
    the same experts run after run, so the bytes read on demand and wasted tell forecasts
    apart: the trace's inputs replaced by zeros must change them. A trace that records no router
    inputs is refused by name, by both harnesses."""
    pred = work / "predictor-hidden"
    run("trace", "convert", work / "ref.jsonl", "-o", tmp_path / "ref.mctrace")
    run("train", "--shards", "2", "--trace", tmp_path / "ref.mctrace", "--task", "lookahead", "--features", "hidden",
        "--horizon", "2", "--epochs", "2", "--batch-size", "4", "--test-fraction", "0", "--quiet", "-o", pred)
    dim = len(next(json.loads(l) for l in (work / "ref.jsonl").read_text().splitlines()[1:])["router_inputs"][0])

    def c_harness(*args):
        out = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-r", "10", "-R", "1", "-b", "1", "-a", "-w", *args],
                             check=True, capture_output=True, text=True).stdout
        print("\n" + out)
        rows = {l.split()[0]: l.split() for l in out.splitlines() if l.startswith(("on-demand", "budget-1"))}
        return out, {m: {"resident": float(r[1].rstrip("%")), "demand": float(r[2]), "staged": float(r[3]),
                         "wasted": float(r[4])} for m, r in rows.items()}

    out, modes = c_harness("-n", "24", str(work / "tiny.f32.gguf"), str(HELDOUT), str(pred))
    assert f"reading router inputs ({dim} wide) from llama.cpp's ffn_norm" in out
    base, budget = modes["on-demand"], modes["budget-1"]
    assert budget["resident"] > base["resident"] and budget["demand"] < 0.9 * base["demand"]

    def replayed(trace):
        return c_harness("-p", str(trace), "-N", "120", str(work / "tiny.f32.gguf"), str(pred))

    out, first = replayed(work / "ref.jsonl")
    assert f"reading router inputs ({dim} wide) from the trace" in out
    assert first["budget-1"]["resident"] > first["on-demand"]["resident"]
    _, again = replayed(work / "ref.jsonl")
    what = ("demand", "staged", "wasted")
    assert [again["budget-1"][c] for c in what] == [first["budget-1"][c] for c in what]
    lines = (work / "ref.jsonl").read_text().splitlines()
    zeroed = tmp_path / "zeroed.jsonl"
    rows = [json.loads(l) for l in lines[1:]]
    for r in rows:
        r["router_inputs"] = [[0.0] * dim for _ in r["router_inputs"]]
    zeroed.write_text("\n".join([lines[0], *map(json.dumps, rows)]) + "\n")
    _, blind = replayed(zeroed)
    assert [blind["budget-1"][c] for c in what] != [first["budget-1"][c] for c in what]

    bare = tmp_path / "no-inputs.jsonl"
    meta = json.loads(lines[0])
    meta["meta"]["channels"] = []
    bare.write_text("\n".join([json.dumps(meta), *(json.dumps({k: v for k, v in r.items() if k != "router_inputs"})
                                                    for r in rows)]) + "\n")
    c = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-p", str(bare), str(work / "tiny.f32.gguf"), str(pred)],
                       capture_output=True, text=True)
    assert c.returncode != 0 and f"reads router inputs {dim} wide" in c.stderr and "records none" in c.stderr, c.stderr
    py = subprocess.run([sys.executable, str(ROOT / "llamacpp" / "moecast_llamacpp.py"), "prefetch", "--model",
                         str(work / "tiny.f32.gguf"), "--replay", str(bare), "--predictor", str(pred)],
                        capture_output=True, text=True)
    assert py.returncode == 1 and "records none" in py.stderr, py.stderr
    report = tmp_path / "replay.json"
    tool("moecast_llamacpp.py", "prefetch", "--model", work / "tiny.f32.gguf", "--replay", work / "ref.jsonl",
         "--replay-tokens", "120", "--predictor", pred, "--resident", "10%", "--rounds", "1", "--json", report)
    modes = json.loads(report.read_text())["modes"]
    # staged (landed or late) rather than landed: when reads land is the machine's speed
    covered = {m: modes[m]["resident_when_used"] + modes[m]["late_staged"] for m in ("budget-1", "on-demand")}
    print("replayed, covered:", covered)
    assert covered["budget-1"] > covered["on-demand"] + 0.10


@pytest.mark.skipif(not os.environ.get("MOECAST_PREFETCH_C"), reason="make test-llamacpp builds the C harness")
def test_c_harness_logs_each_step_for_the_read_cost_fit(work, tmp_path):
    """-s STEPS.csv: one row per timed decode step of every mode and round, whose seconds
    make up each round's tokens/s and whose demand reads add up to the table's demand MB
    (on demand stages and forecasts nothing, the oracle and planned stage); the file
    appears only when the run ends. llamacpp/step_costs.py fits what a staged and a
    demand read add to a step from it (at 10% resident every routed expert is staged or
    read on demand, 12 a step, and the two cannot be told apart; at 25% some are
    resident), and refuses a log it cannot read, naming the line."""
    steps = tmp_path / "steps.csv"
    predictor = [str(work / "predictor")] if (work / "predictor").exists() else []
    modes = ["on-demand", "oracle"] + (["planned"] if predictor else [])
    run = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-p", str(work / "ref.jsonl"), "-N", "120", "-r", "25",
                          "-b", "auto,oracle", "-G", "-t", "10,1000", "-R", "2", "-s", str(steps),
                          str(work / "tiny.f32.gguf"), *predictor], check=True, capture_output=True, text=True)
    out = run.stdout
    print("\n" + out)
    expert_bytes = int(re.search(r"(\d+) bytes per expert", out).group(1))
    rows = [l.split(",") for l in steps.read_text().splitlines()[1:]]
    assert not (tmp_path / "steps.csv.partial").exists()
    assert {r[0] for r in rows} == set(modes)
    for mode in modes:
        mine = [r for r in rows if r[0] == mode]
        for k in (1, 2):
            timed = [float(r[3]) for r in mine if r[1] == str(k)]
            tps = float(re.search(rf"round {k}/2 {mode}: ([\d.]+) tokens/s", run.stderr).group(1))
            assert len(timed) == 120 and abs(120 / sum(timed) - tps) <= 0.05 + 0.001 * tps, (mode, k, tps)
        table = next(l.split() for l in out.splitlines() if l.startswith(mode + " "))
        demand_mb = sum(int(r[5]) for r in mine) / 2 * expert_bytes / 1e6
        assert abs(demand_mb - float(table[2])) < 0.01, (mode, demand_mb, table)
        staged = sum(int(r[4]) for r in mine)
        assert staged == 0 if mode == "on-demand" else staged > 100, (mode, staged)
    assert all(r[2] == "0" for r in rows if r[0] == "on-demand")
    assert all(r[2] == "1" for r in rows if r[0] != "on-demand")
    fit = tool("step_costs.py", steps, "--json", tmp_path / "fit.json")
    print(fit)
    assert re.search(r"^oracle .* a staged read -?\d+\.\d\d ms \(\+-\d+\.\d\d\); a demand read", fit, re.M), fit
    assert set(json.loads((tmp_path / "fit.json").read_text())) == set(modes)
    bad = tmp_path / "bad.csv"
    bad.write_text(steps.read_text().splitlines()[0] + "\n" + "oracle,1,1,0.01,2\n")
    run = subprocess.run([sys.executable, str(ROOT / "llamacpp" / "step_costs.py"), str(bad)], capture_output=True,
                         text=True)
    assert run.returncode != 0 and "bad.csv: line 2: 5 fields" in run.stderr, run.stderr
