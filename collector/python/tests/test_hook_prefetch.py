"""The transformers hook's prefetch mode (`moecast_hook.ExpertOffloader`) on the fixture
checkpoints (inference/tests/fixtures/hf): with 3 of a layer's 8 experts resident (the rest
NaN in the live weights, loaded from the slow tier when routed) the model generates
exactly the unmodified model's tokens and logits, on demand and with a predictor staging
forecasts; a skipped load shows as NaN; a lookahead predictor trained on the fixture's own
`moecast collect` traces (prompts/demo.txt) raises the share of routed experts resident
when their router runs above on-demand LRU's on the held-out prompts (prompts/heldout.txt);
mismatched predictors and unsupported models are refused by name.

Needs torch, transformers 5, the `moecast` package (`pip install ./python`) and the
`moecast` binary (MOECAST_BIN, default target/debug/moecast). `-s` prints the hit rates:

    MOECAST_BIN=target/debug/moecast python3 -m pytest -q -s collector/python/tests
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moecast
import torch
import transformers

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "collector" / "python"))
from moecast_hook import ExpertOffloader  # noqa: E402

BIN = os.environ.get("MOECAST_BIN", str(ROOT / "target" / "debug" / "moecast"))
FIXTURES = ROOT / "inference" / "tests" / "fixtures" / "hf"
ARCHS = ["qwen3_moe", "mixtral"]
CAPACITY = 3  # experts resident per MoE layer, of 8 (top-2)
NEW = 24  # tokens generated per prompt


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def run(*args):
    if not os.path.exists(BIN):
        pytest.fail(f"{BIN} not found: build it (cargo build) or set MOECAST_BIN")
    r = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"moecast {args[0]} failed:\n{r.stderr}"


def load(arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        FIXTURES / arch, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    return model.eval()


def prompts(arch, path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURES / arch)
    lines = [l.rstrip("\n") for l in open(path) if l.strip()]
    return [tok(l, add_special_tokens=False)["input_ids"] for l in lines]


def generate(model, ids, seed=None):
    """NEW tokens after `ids`: greedy, or sampled at temperature 1 from `seed`."""
    sampling = {}
    if seed is not None:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": 1.0}
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
            return_dict_in_generate=True, output_logits=True, **sampling,
        )
    return out.sequences[0].tolist(), torch.stack(out.logits)


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    """A small lookahead predictor per fixture, trained on `moecast collect` traces of it
    (prompts/demo.txt, 4 samples at temperature 1, 32 new tokens each)."""
    d = tmp_path_factory.mktemp("prefetch")
    out = {}
    for arch in ARCHS:
        trace = d / f"{arch}.mctrace"
        run("collect", "--model", FIXTURES / arch, "--prompts", ROOT / "prompts" / "demo.txt", "--samples", "4",
            "--temperature", "1.0", "--max-new-tokens", "32", "-o", trace)
        out[arch] = d / f"{arch}-predictor"
        run("train", "--shards", "2", "--trace", trace, "--task", "lookahead", "--d-model", "32", "--layers", "1", "--heads", "2",
            "--context", "32", "--epochs", "5", "--seed", "0", "--quiet", "-o", out[arch])
    return out


@pytest.mark.parametrize("policy", ["on-demand", "predictor"])
@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_model_generates_what_the_model_generates(arch, policy, predictors):
    ids = [json.load(open(FIXTURES / arch / "expected.json"))["prompts"][0]["input_ids"]]
    ids += prompts(arch, ROOT / "prompts" / "heldout.txt")[:3]
    ref = load(arch)
    expected = [generate(ref, p) for p in ids]
    model = load(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    off = ExpertOffloader(model, CAPACITY, predictor=predictors[arch] if policy == "predictor" else None)
    for L in off.layers:  # cold: every expert's slice poisoned
        assert all(p.isnan().all() for _, p in L.params)
    for p, (tokens, logits) in zip(ids, expected):
        got, got_logits = generate(model, p)
        assert got == tokens
        assert (got_logits - logits).abs().max().item() <= 1e-5
        for L in off.layers:  # at most CAPACITY experts hold weights, the others NaN
            assert len(L.resident) <= CAPACITY
            for _, w in L.params:
                live = ~w.reshape(w.shape[0], -1).isnan().any(dim=1)
                assert sorted(live.nonzero().flatten().tolist()) == sorted(L.resident)
    r = off.report()
    assert r["decode_steps"] == len(ids) * (NEW - 1)
    assert r["routed"] == r["decode_steps"] * r["moe_layers"] * 2
    assert r["demand_loads"] > 0 and r["hits"] < r["routed"], r  # the capacity binds
    if policy == "predictor":
        assert r["staged_loads"] > 0 and r["staged_used"] > 0, r
    off.remove()
    for n, p in model.named_parameters():  # whole again
        assert torch.equal(p, before[n]), n


def test_safetensors_slow_tier(tmp_path):
    arch = "qwen3_moe"
    ids = prompts(arch, ROOT / "prompts" / "heldout.txt")[3]
    tokens, logits = generate(load(arch), ids)
    model = load(arch)
    with ExpertOffloader(model, CAPACITY, slow_tier=tmp_path / "experts.safetensors") as off:
        got, got_logits = generate(model, ids)
        assert off.report()["demand_loads"] > 0
    assert got == tokens
    assert (got_logits - logits).abs().max().item() <= 1e-5


def test_a_skipped_load_shows_as_nan(monkeypatch):
    """The control for the tests above: an expert computed without being loaded gives NaN."""
    arch = "qwen3_moe"
    ids = prompts(arch, ROOT / "prompts" / "heldout.txt")[0]
    model = load(arch)
    off = ExpertOffloader(model, CAPACITY)
    load_expert = ExpertOffloader._load

    def skip_in_decode(self, L, e):
        if not (self._ctx and self._ctx["decode"]):
            load_expert(self, L, e)

    monkeypatch.setattr(ExpertOffloader, "_load", skip_in_decode)
    _, logits = generate(model, ids)
    assert not logits[0].isnan().any()  # the prompt's loads happened
    assert logits[1:].isnan().any()
    off.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefetch_raises_the_hit_rate(arch, predictors):
    """Held-out prompts, each sampled at temperature 1 from its own seed (both policies decode
    the same tokens); at 2, 3 and 4 of 8 experts resident per layer."""
    held = prompts(arch, ROOT / "prompts" / "heldout.txt")
    for capacity in (2, 3, 4):
        reports = {}
        for policy, pred in (("on-demand", None), ("predictor", predictors[arch])):
            model = load(arch)
            off = ExpertOffloader(model, capacity, predictor=pred)
            seqs = [generate(model, p, seed=i)[0] for i, p in enumerate(held)]
            reports[policy] = off.report()
            reports[policy]["seqs"] = seqs
            off.remove()
        a, b = reports["on-demand"], reports["predictor"]
        assert a["seqs"] == b["seqs"]
        print(f"\n{arch} capacity {capacity}/8 per layer, {len(held)} held-out prompts x {NEW} tokens: "
              f"on-demand hit rate {a['hit_rate']:.3f} ({a['demand_loads']} demand loads); "
              f"predictor {b['hit_rate']:.3f} ({b['demand_loads']} demand, {b['staged_loads']} staged, "
              f"{b['staged_used']} staged and used)")
        assert b["hit_rate"] > a["hit_rate"]
        assert b["demand_loads"] < a["demand_loads"]


def test_mismatched_predictor_is_refused(predictors):
    model = load("mixtral")  # 3 MoE layers; the qwen3_moe fixture's predictor has 2
    with pytest.raises(ValueError) as e:
        ExpertOffloader(model, CAPACITY, predictor=predictors["qwen3_moe"])
    msg = str(e.value)
    assert str(predictors["qwen3_moe"]) in msg
    assert "predictor shape 2 MoE layers x 8 experts, top-2" in msg
    assert "the model's 3 MoE layers x 8 experts, top-2" in msg
    with pytest.raises(ValueError, match="predictor shape 2 MoE layers.*model's 3 MoE layers"):
        ExpertOffloader(model, CAPACITY, predictor=moecast.Predictor(predictors["qwen3_moe"]))
    assert not any(p.isnan().any() for p in model.parameters())  # refused before touching the weights


def test_unsupported_models_are_refused():
    model = load("qwen3_moe")
    with pytest.raises(ValueError, match="capacity 8 per layer"):
        ExpertOffloader(model, 8)
    with pytest.raises(ValueError, match="capacity 1 per layer"):
        ExpertOffloader(model, 1)
    # older transformers' layout: one module per expert
    model.model.layers[2].mlp.experts = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(8)])
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts \(ModuleList\) is not a fused experts"):
        ExpertOffloader(model, CAPACITY)
    model = load("qwen3_moe")
    model.config._experts_implementation = "deepgemm"
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts \(Qwen3MoeExperts\) runs "
                                         r"experts_implementation='deepgemm'"):
        ExpertOffloader(model, CAPACITY)
