"""moecast's C harness in llama.cpp (llamacpp/moecast_prefetch.c, through libmoecast's C
ABI; MOECAST_PREFETCH_C, built by `make test-llamacpp`): it stages what the predictor
trained in test_llamacpp.py forecasts, plans, replays traces with their experts forced,
takes turns over the same steps, and logs each step.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import HELDOUT, ROOT, covered, run, tool


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
    callback; the predictor (trained in test_llamacpp.py) must stage there too, cutting
    the reads on demand, with a fixed budget and with the C ABI's planner, forecasting in
    the callback (the default) and on a prefetcher thread (-a). There the callback waits for each forecast
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
    # the same reads; the kernel may still reclaim a held expert's pages (one expert's leeway)
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
    ms, and no more than two forecasts wait), every forecast lands late and none is
    offered, where the same run without the hold offers thousands (about 3,000 here; the
    test asks for more than 300)."""
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
                           (["-W", "8"], "-W: takes the steps"), (["-p", "t.mctrace", "-W", "0"], "-W: takes the steps"),
                           (["-e", "mru"], "-e: takes lru, lfu or next-use"), (["-b", "-1"], "-b: takes a comma list")):
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
def test_c_harness_lfu_keeps_the_often_used_experts(work):
    """The resident set drops the least frequently used expert (-e lfu, the default); -b
    lru adds an on-demand mode that drops the least recently used, -b next-use one that
    drops the expert moecast's next-use estimate (mc_next_use_*) expects latest. A 10%
    resident set (10 experts) is smaller than a token's 12, so under LRU each layer's
    experts are dropped just before the layer comes round again and on demand finds none
    resident; LFU and next-use keep the experts tokens reuse, find some and read fewer.
    The replay forces the routing, so the counts are the trace's whatever the machine's
    speed; -e lru swaps LRU and LFU."""
    def on_demand(*flags):
        out = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-p", str(work / "ref.jsonl"), "-N", "120", "-r", "10",
                              "-R", "1", *flags, str(work / "tiny.f32.gguf")],
                             check=True, capture_output=True, text=True).stdout
        print("\n" + out)
        rows = {l.split()[0]: l.split() for l in out.splitlines() if l.startswith("on-demand")}
        return out, {m: (float(r[1].rstrip("%")), float(r[2])) for m, r in rows.items()}

    out, modes = on_demand("-b", "lru,next-use")
    assert "lfu eviction" in out and set(modes) == {"on-demand", "on-demand-lru", "on-demand-next-use"}
    (lfu_resident, lfu_demand), (lru_resident, lru_demand) = modes["on-demand"], modes["on-demand-lru"]
    assert lru_resident < 2 and lfu_resident > lru_resident + 8
    assert lfu_demand < 0.92 * lru_demand
    next_use_resident, next_use_demand = modes["on-demand-next-use"]
    assert next_use_resident > lru_resident + 8 and next_use_demand < 0.92 * lru_demand
    del modes["on-demand-next-use"]
    out, swapped = on_demand("-e", "lru", "-b", "lfu")
    assert "lru eviction" in out and set(swapped) == {"on-demand", "on-demand-lfu"}
    # the same evictions: the same counts, up to one expert the kernel may reclaim (0.2 MB)
    for a, b in ((swapped["on-demand"], modes["on-demand-lru"]), (swapped["on-demand-lfu"], modes["on-demand"])):
        assert abs(a[0] - b[0]) < 1 and abs(a[1] - b[1]) <= 0.2


@pytest.mark.skipif(not os.environ.get("MOECAST_PREFETCH_C"), reason="make test-llamacpp builds the C harness")
def test_c_harness_oracle_stages_the_replayed_experts(work):
    """-b oracle (with -p) plans as `auto` does from the replayed trace's own experts, no
    predictor needed: with reads stated fast (10 us against 1 ms layers) and no guard it
    stages most routed experts ahead of use, where on demand a 10% resident set (10
    experts, fewer than a token's 12) dropping the least recently used (-e lru) holds
    none of them. The planner's staging limit
    (keeping an entry alive a token where demand paging would) must not take the misses
    that staging saved as demand paging's own: it held a sure forecast to one read a
    lookup, and half of on demand's reads stayed (now 2%). Forecasts run on the
    prefetcher's thread and each is waited for (-a -w): in a read's shadow (the default) a
    layer forecasts only when it misses, so what is staged would follow the landing times
    (there 12% of on demand's reads stayed in one run, another share in the next). Stated
    slow (1 s) no read
    pays and it reads what on demand reads."""
    def modes(*flags):
        out = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-p", str(work / "ref.jsonl"), "-N", "120", "-r", "10",
                              "-b", "auto,oracle", "-G", "-e", "lru", *flags, str(work / "tiny.f32.gguf")],
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
    resident set put back in the page cache first and every other expert dropped. On
    demand then finds no expert in memory that it does not hold (had the oracle's staged
    experts stayed, it would: the run counts such uses) and reads exactly what it reads
    decoding the round alone. Forecasting on the prefetcher's thread and waiting for each
    (-a -w), the oracle's decisions do not hang on when reads land, so it stages and reads
    on demand exactly what it does alone; were its own set not put back, its used experts
    would be read again. (In a read's shadow, the default, a layer forecasts only when it
    misses, so what is staged follows the landing times and differs run to run.) The
    windows' seconds, pooled, give the round's ratio over on demand, and their
    bootstrap's interval holds it."""
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
    assert re.search(r"^uses of experts not held but in memory.*: on-demand 0,", out, re.M), out
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
    assert covered(modes["budget-1"]) > covered(modes["on-demand"]) + 0.10


@pytest.mark.skipif(not os.environ.get("MOECAST_PREFETCH_C"), reason="make test-llamacpp builds the C harness")
def test_c_harness_logs_each_step_for_the_read_cost_fit(work, tmp_path):
    """-s STEPS.csv: one row per timed decode step of every mode and round, whose seconds
    make up each round's tokens/s and whose demand reads add up to the table's demand MB
    (on demand stages and forecasts nothing, the oracle and planned stage); the file
    appears only when the run ends. llamacpp/step_costs.py fits what a staged and a
    demand read add to a step from it (at 10% resident under LRU every routed expert is
    staged or read on demand, 12 a step, and the two cannot be told apart; at 25% some
    are resident), and refuses a log it cannot read, naming the line. -L breaks the table's
    staged and demand reads down by MoE layer: they add up to its columns, and no layer
    uses more staged experts than were staged for it."""
    steps = tmp_path / "steps.csv"
    predictor = [str(work / "predictor")] if (work / "predictor").exists() else []
    modes = ["on-demand", "oracle"] + (["planned"] if predictor else [])
    run = subprocess.run([os.environ["MOECAST_PREFETCH_C"], "-p", str(work / "ref.jsonl"), "-N", "120", "-r", "25",
                          "-b", "auto,oracle", "-G", "-t", "10,1000", "-R", "2", "-s", str(steps), "-L",
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
    header = out.splitlines().index(next(l for l in out.splitlines() if l.startswith("per MoE layer"))) + 1
    names = out.splitlines()[header].split()[1:]
    assert sorted(names) == sorted(modes), names
    lines = out.splitlines()[header + 1:]
    lines = lines[:next((i for i, l in enumerate(lines) if not l[:5].strip().isdigit()), len(lines))]
    assert [int(l.split()[0]) for l in lines] == list(range(len(lines))) and lines, out
    layers = [re.findall(r"(\d+) \((\d+)\) / (\d+)", l) for l in lines]
    assert all(len(cells) == len(names) for cells in layers), layers
    for m, mode in enumerate(names):
        table = next(l.split() for l in out.splitlines() if l.startswith(mode + " "))
        staged, used, demand = (sum(int(cells[m][i]) for cells in layers) for i in range(3))
        leeway = len(layers) * expert_bytes / 1e6  # a round's mean, each layer's rounded
        assert abs(demand * expert_bytes / 1e6 - float(table[2])) <= leeway, (mode, demand, table)
        assert abs(staged * expert_bytes / 1e6 - float(table[3])) <= leeway, (mode, staged, table)
        assert all(int(c[m][1]) <= int(c[m][0]) for c in layers), (mode, layers)
        assert (staged == 0) == (mode == "on-demand"), (mode, staged)
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
