#!/usr/bin/env python3
"""Build tiny, randomly initialised Hugging Face MoE checkpoints + reference outputs.

Usage:  python3 tools/hf_fixtures.py [--out inference/tests/fixtures/hf]

For every architecture of ``hf_archs.py`` (ARCHS, and the RoPE variants) this writes
``<out>/<arch>/`` containing ``config.json`` / ``generation_config.json`` (as
``save_pretrained`` writes them),
``model.safetensors`` (f32, published on-disk tensor layout), ``tokenizer.json`` +
``tokenizer_config.json`` (tiny byte-level BPE trained on CORPUS below) and
``expected.json`` (token ids, per-token routing, logits, greedy decode).
``qwen3_moe_sharded_bf16/`` is the qwen3_moe model cast to bf16 and saved as 2 shards
+ ``model.safetensors.index.json``; its expected outputs come from loading that bf16
checkpoint and running it upcast to f32 (``.float()``).
``<arch>_rope_linear/`` and ``<arch>_rope_yarn/`` (mixtral, qwen2_moe, qwen3_moe, olmoe)
are the same shapes with ``rope_parameters`` scaled (linear x4; YaRN x4 over an original
context of 16 positions), each with its own seed and expected outputs.
``mixtral_sliding/``, ``qwen2_moe_sliding/`` and ``qwen3_moe_sliding/`` attend over a
sliding window of 5 positions (``hf_archs.py``'s SLIDING), shorter than the prompts.

Everything is computed on CPU, f32, eager attention, eager experts, 1 thread,
deterministic algorithms; seeds are searched deterministically, so reruns are
byte-identical.  Nothing is downloaded.

ROUTER HOOKS (transformers 5.24).  A forward hook sits on the router module of every
MoE layer; the module returns ``(router_logits, weights, indices)`` and ``weights`` is
exactly what multiplies each expert's output in ``<Arch>Experts.forward``.  We store
ids/weights re-sorted by weight, descending (stable), so ``topk_ids[r]`` has the r-th
largest weight.  Each hook output is also re-derived from router_logits by an
independent reference (``hf_reference.py``'s ``_reference_route``) and must match; that
reference gives the score gaps behind ``min_topk_gap``.

* mixtral     -- ``model.layers.{l}.mlp.gate`` (MixtralTopKRouter; on disk
  ``block_sparse_moe.gate``). p = softmax(x W^T) in f32; ids = top-k of p; weights =
  p[ids] / sum(p[ids]) (always renormalised).
* qwen2_moe   -- ``model.layers.{l}.mlp.gate`` (Qwen2MoeTopKRouter). p = softmax(logits);
  ids = top-k(p); weights = p[ids] (norm_topk_prob=False: NOT renormalised).  Routed
  experts only; the block also adds sigmoid(shared_expert_gate(x)) * shared_expert(x),
  which is not part of the recorded weights.
* qwen3_moe   -- ``model.layers.{l}.mlp.gate`` (Qwen3MoeTopKRouter). As qwen2_moe but
  norm_topk_prob=True: weights = p[ids] / sum(p[ids]).  No shared expert.  Layer 1 is a
  dense Qwen3MoeMLP (mlp_only_layers=[1]), so moe_layers=[0, 2].
* olmoe       -- ``model.layers.{l}.mlp.gate`` (OlmoeTopKRouter). softmax -> top-k,
  norm_topk_prob=False: weights = p[ids] (not renormalised).
* deepseek_v2 -- ``model.layers.{l}.mlp.gate`` (DeepseekV2TopkRouter), layer 0 dense
  (first_k_dense_replace=1).  p = softmax(logits) f32; topk_method=group_limited_greedy
  (n_group=2 x 4 experts, topk_group=1, so the limit bites): group score = max p within
  each contiguous group, keep the topk_group best groups, zero the rest, ids = top-k of
  masked p; weights = p[ids] * routed_scaling_factor
  (NO renormalisation: transformers' V2 router ignores norm_topk_prob, which is False
  anyway).  Plus n_shared_experts shared experts (one MLP of width
  n_shared*moe_intermediate_size, ungated).
* deepseek_v3 -- ``model.layers.{l}.mlp.gate`` (DeepseekV3TopkRouter), layer 0 dense.
  s = sigmoid(logits) f32; choice = s + e_score_correction_bias (random, non-zero);
  n_group=4 x 2 experts, topk_group=2, top-k 3;
  group score = sum of top-2 choice scores in each group; keep topk_group groups
  (others -> -inf); ids = top-k of choice; weights = s[ids] (UNBIASED) /
  (sum(s[ids]) + 1e-20) * routed_scaling_factor.  Ranking below is by these weights,
  which can differ from the ranking by biased choice score.  Plus a shared expert.
* gpt_oss     -- ``model.layers.{l}.mlp.router`` (GptOssTopKRouter). logits = x W^T + b;
  ids = top-k of logits; weights = softmax over the k selected logits only.

min_topk_gap: smallest, over every token / MoE layer / case (prefill and decode), of
the gap between the k-th and (k+1)-th selection score (softmax prob for
mixtral/qwen*/olmoe/deepseek_v2, raw logit for gpt_oss, biased sigmoid score for
deepseek_v3) and, for group-limited routers, also between the topk_group-th and
(topk_group+1)-th group score.  Seeds are advanced until it is > GAP_MIN and the greedy
argmax margins are > GAP_MIN too.

ON-DISK LAYOUT (written by transformers' own save_pretrained, which reverses its
load-time expert fusion; check_layout() asserts it and the directory is reloaded with
AutoModelForCausalLM.from_pretrained and must give identical weights and logits):
* mixtral: model.layers.{l}.block_sparse_moe.gate.weight [E, H],
  ...block_sparse_moe.experts.{e}.w1/w3 [I, H] (gate/up), w2 [H, I] (down).
* qwen2_moe / qwen3_moe / olmoe / deepseek_v2 / deepseek_v3: model.layers.{l}.mlp.gate.weight
  [E, H]; ...mlp.experts.{e}.gate_proj/up_proj [I, H], down_proj [H, I]; qwen2_moe adds
  mlp.shared_expert.{gate,up,down}_proj + mlp.shared_expert_gate.weight [1, H]; deepseek
  adds mlp.shared_experts.* and (v3) mlp.gate.e_score_correction_bias [E]; dense layers
  are mlp.{gate,up,down}_proj.
* gpt_oss: the unquantised (bf16-style) form of openai/gpt-oss: mlp.router.weight [E, H] +
  .bias [E]; mlp.experts.gate_up_proj [E, H, 2I] + gate_up_proj_bias [E, 2I];
  mlp.experts.down_proj [E, I, H] + down_proj_bias [E, H]; self_attn.sinks [heads].
  (The hub release stores the expert matrices as MXFP4 *_blocks/*_scales, which
  transformers' mxfp4 integration dequantises and transposes into exactly this layout.)
All tensors f32 except qwen3_moe_sharded_bf16.  After the standard init, norm weights are
re-drawn as 1 + 0.1 N(0,1) and all biases / sinks as N(0, initializer_range)
(e_score_correction_bias: N(0, 0.1)) so that none of them is a no-op.

Other arch notes useful to a reimplementation:
* config.json uses transformers-5 names (``rope_parameters`` instead of rope_theta /
  rope_scaling; qwen3_moe writes ``num_local_experts`` (alias of num_experts)).
* deepseek_v2 applies RoPE to *interleaved* pairs (complex view); deepseek_v3 too
  (rope_interleave=true).  The others use rotate_half (gpt_oss: first/second half).
* gpt_oss keeps its default YaRN rope (factor 32, original_max_position_embeddings
  4096, beta_fast 32, beta_slow 1, truncate false), as published; cos/sin carry the YaRN
  attention factor.  Sliding layers attend to keys with q - k < sliding_window (window
  includes the current token).  Attention sinks: one logit per head appended to the
  softmax, then dropped.  Experts: gate = gate_up[..., ::2], up = gate_up[..., 1::2]
  (interleaved), clamp(gate, max=7), clamp(up, -7, 7), out = (up + 1) * gate *
  sigmoid(1.702 gate); weights stored as x @ W ([E, hidden, 2*inter], [E, inter, hidden]).
* Decode ignores EOS: always DECODE_STEPS forward passes.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys

import torch

import safetensors
import tokenizers
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM

from hf_archs import (
    ARCHS, BOS_ID, EOS_ID, LOAD_KW, MODEL_CLASS, PAD_ID, ROUTER_DOC, SLIDING, SPECIALS, VARIANTS, VOCAB, build_model
)
from hf_reference import DECODE_STEPS, LOGITS_TOPN, logits_of, r7, run_all

GAP_MIN = 1e-3
MAX_SEEDS = 400

CORPUS = [
    "Mixture of experts models route every token to a few experts.",
    "The router picks the top experts and mixes their outputs with weights.",
    "A tiny model with random weights still routes tokens in a stable way.",
    "Shared experts see every token, routed experts only see some tokens.",
    "Sliding window attention looks back a fixed number of tokens.",
    "The cache keeps keys and values so decoding one token is cheap.",
    "Experts, routers, tokens, weights, layers and logits.",
    "Rust should reproduce these numbers to within a small tolerance.",
]
TEXT_PROMPT = "The router picks experts for every token."
IDS_PROMPT = [17, 250, 3, 99, 141, 64, 200, 5, 77, 123, 31, 266, 45, 88, 180, 9]

# ----------------------------------------------------------------------------- utils


def setup_torch():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)


def _fmt(obj, ind=0):
    """JSON with dicts / lists-of-dicts indented and lists of numbers kept on one line."""
    pad = " " * ind
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{pad} {json.dumps(k)}: {_fmt(v, ind + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        items = [pad + " " + _fmt(v, ind + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, separators=(",", ":"))


def dump_json(path, obj):
    with open(path, "w") as f:
        f.write(_fmt(obj))
        f.write("\n")

# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(add_bos):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B:1", special_tokens=[("<|bos|>", BOS_ID)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.token_to_id("<|bos|>") == BOS_ID and tok.token_to_id("<|eos|>") == EOS_ID
    assert tok.get_vocab_size() <= VOCAB
    return tok


def save_tokenizer(tok, add_bos, d):
    tok.save(os.path.join(d, "tokenizer.json"))
    dump_json(
        os.path.join(d, "tokenizer_config.json"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|bos|>",
            "eos_token": "<|eos|>",
            "pad_token": "<|pad|>",
            "add_bos_token": add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 128,
        },
    )


def check_generate(model, input_ids, generated):
    """model.generate must agree with the manual loop (EOS disabled)."""
    gc = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=len(generated), eos_token_id=None, pad_token_id=PAD_ID
    )
    ids = torch.tensor([input_ids])
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(ids, generation_config=gc)
    finally:
        model.generation_config.eos_token_id = saved
    got = out[0, len(input_ids):].tolist()
    assert got == generated, ("generate mismatch", got, generated)


# ----------------------------------------------------------------------------- layout checks


def check_layout(arch, d, cfg):
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    keys = {}
    for f in files:
        with safe_open(os.path.join(d, f), "pt") as sf:
            for k in sf.keys():
                keys[k] = tuple(sf.get_slice(k).get_shape())
    E = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or cfg.n_routed_experts
    if arch == "mixtral":
        l = 0
        for e in range(E):
            for w in ("w1", "w2", "w3"):
                assert f"model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight" in keys
        assert f"model.layers.{l}.block_sparse_moe.gate.weight" in keys
    elif arch == "gpt_oss":
        for s in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
            assert f"model.layers.0.mlp.experts.{s}" in keys
        assert keys["model.layers.0.mlp.experts.gate_up_proj"] == (E, cfg.hidden_size, 2 * cfg.intermediate_size)
        assert keys["model.layers.0.mlp.experts.down_proj"] == (E, cfg.intermediate_size, cfg.hidden_size)
        for s in ("mlp.router.weight", "mlp.router.bias", "self_attn.sinks"):
            assert f"model.layers.0.{s}" in keys
    else:
        l = next(i for i in range(cfg.num_hidden_layers) if f"model.layers.{i}.mlp.gate.weight" in keys)
        for e in range(E):
            for w in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{l}.mlp.experts.{e}.{w}.weight" in keys, (arch, l, e, w)
        assert not any("gate_up_proj" in k for k in keys), arch
        if arch == "deepseek_v3":
            assert f"model.layers.{l}.mlp.gate.e_score_correction_bias" in keys
    return files, keys


@torch.no_grad()
def gpt_oss_checks(model, cases):
    """The sliding window and the swiglu clamp must both influence the outputs."""
    hits, total = 0, 0
    lim = model.config.swiglu_limit
    handles = []

    def hook(mod, inputs, output):
        nonlocal hits, total
        x = inputs[0]
        gu = x @ mod.gate_up_proj + mod.gate_up_proj_bias[:, None, :]  # all experts, all tokens
        g, u = gu[..., ::2], gu[..., 1::2]
        hits += int((g > lim).sum() + (u.abs() > lim).sum())
        total += gu.numel()

    for layer in model.model.layers:
        handles.append(layer.mlp.experts.register_forward_hook(hook))
    ref = logits_of(model, cases)
    for h in handles:
        h.remove()
    assert hits > 0, "swiglu clamp never active"
    window = model.config.sliding_window
    assert max(len(c["input_ids"]) for c in cases) > window
    model.config.sliding_window = 10_000
    for layer in model.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = 10_000
    try:
        wide = logits_of(model, cases)
    finally:
        model.config.sliding_window = window
        for layer in model.model.layers:
            if layer.self_attn.sliding_window is not None:
                layer.self_attn.sliding_window = window
    d = max(float((a - b).abs().max()) for a, b in zip(ref, wide))
    assert d > 1e-2, ("sliding window has no effect", d)
    assert all(torch.equal(a, b) for a, b in zip(ref, logits_of(model, cases)))
    return {
        "swiglu_clamp_hits_all_experts_prefill": hits,
        "swiglu_clamp_elements_all_experts_prefill": total,
        "max_logit_change_if_no_sliding_window": r7(d),
    }


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]


# ----------------------------------------------------------------------------- main


def prompts_for(tok, add_bos):
    enc = tok.encode(TEXT_PROMPT, add_special_tokens=add_bos)
    return [
        {
            "name": "text",
            "text": TEXT_PROMPT,
            "add_special_tokens": add_bos,
            "input_ids": enc.ids,
        },
        {"name": "ids", "text": None, "add_special_tokens": False, "input_ids": list(IDS_PROMPT)},
    ]


def header(arch, cfg, seed, moe_layers, gap, margin, dtype_desc, stats, extra=None):
    h = {
        "arch": arch,
        "model_class": MODEL_CLASS[arch],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "safetensors_version": safetensors.__version__,
        "dtype": "float32",
        "weights_dtype": dtype_desc,
        "seed": seed,
        "attn_implementation": "eager",
        "experts_implementation": "eager",
        "moe_layers": moe_layers,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "min_topk_gap": r7(gap),
        "min_argmax_logit_margin": r7(margin),
        "decode_steps": DECODE_STEPS,
        "logits_top_n": LOGITS_TOPN,
        "layout": (
            "prefill.topk_ids/topk_weights: [token][i][rank] for model layer moe_layers[i], ranks sorted by "
            "weight descending; weights are exactly what multiplies each routed expert output. "
            "prefill_logits: full-vocab logits of the last prompt position. decode[s]: input_id at position, "
            "routing [i][rank] for that token, top logits_top_n logits (ids/values, descending) and argmax. "
            "generated_ids[0] = argmax(prefill_logits), generated_ids[s+1] = decode[s].argmax; decode[s].input_id "
            "= generated_ids[s]. EOS is ignored. Floats rounded to 7 significant digits."
        ),
    }
    h["router"] = ROUTER_DOC[arch]
    h["stats"] = stats
    if extra:
        h.update(extra)
    return h


def build_arch(name, out_root):
    """Builds fixture ``name``: an architecture of ARCHS, a RoPE-scaled VARIANTS entry or
    a SLIDING one."""
    arch, rope = VARIANTS.get(name, (name, None))
    arch, overrides = SLIDING.get(name, (arch, None))
    add_bos = ARCHS[arch]["add_bos"]
    tok = build_tokenizer(add_bos)
    cases = prompts_for(tok, add_bos)
    assert all(max(c["input_ids"]) < VOCAB for c in cases)

    if overrides is not None:
        base = 200_000 + 1000 * list(SLIDING).index(name)
    elif rope is None:
        base = 1000 * (list(ARCHS).index(arch) + 1)
    else:
        base = 100_000 + 1000 * list(VARIANTS).index(name)
    for seed in range(base, base + MAX_SEEDS):
        model = build_model(arch, seed, rope, overrides)
        results, moe_layers, gap, margin, stats = run_all(arch, model, cases)
        if gap > GAP_MIN and margin > GAP_MIN:
            break
    else:
        raise RuntimeError(f"{name}: no seed with gaps > {GAP_MIN}")
    cfg = model.config
    if rope is not None:
        assert cfg.rope_parameters["rope_type"] == rope, cfg.rope_parameters
    print(f"[{name}] seed={seed} min_topk_gap={gap:.4g} argmax_margin={margin:.4g} moe_layers={moe_layers}")
    for c, r in zip(cases, results):
        check_generate(model, c["input_ids"], r["generated_ids"])

    d = os.path.join(out_root, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    model.save_pretrained(d)
    files, _ = check_layout(arch, d, cfg)
    assert files == ["model.safetensors"], files

    # reload from disk: identical parameters and identical logits
    ref = logits_of(model, cases)
    re = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **LOAD_KW).eval()
    sd0, sd1 = model.state_dict(), re.state_dict()
    assert sorted(sd0) == sorted(sd1)
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), (arch, k)
    for a, b in zip(ref, logits_of(re, cases)):
        assert torch.equal(a, b), arch

    save_tokenizer(tok, add_bos, d)
    chk = transformers.AutoTokenizer.from_pretrained(d)
    assert chk(TEXT_PROMPT)["input_ids"] == cases[0]["input_ids"], (arch, chk(TEXT_PROMPT)["input_ids"])

    if arch == "gpt_oss":
        stats.update(gpt_oss_checks(model, cases))
    if overrides is not None:
        extra = {"variant": name, "sliding_window": cfg.sliding_window}
    elif rope is not None:
        extra = {"variant": name, "rope_parameters": cfg.rope_parameters}
    else:
        extra = None
    exp = header(arch, cfg, seed, moe_layers, gap, margin, "float32", stats, extra)
    exp["prompts"] = results
    dump_json(os.path.join(d, "expected.json"), exp)

    if name == "qwen3_moe":
        build_sharded_bf16(model, tok, add_bos, cases, seed, out_root)
    return model


def build_sharded_bf16(model, tok, add_bos, cases, seed, out_root):
    arch = "qwen3_moe"
    d = os.path.join(out_root, "qwen3_moe_sharded_bf16")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    bf = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32, **LOAD_KW)
    bf.load_state_dict(model.state_dict())
    bf = bf.to(torch.bfloat16).eval()
    total = sum(t.numel() * t.element_size() for t in bf.state_dict().values())
    bf.save_pretrained(d, max_shard_size=total // 2 + 4096)
    files, _ = check_layout(arch, d, model.config)
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], files
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    cfgj = json.load(open(os.path.join(d, "config.json")))
    assert cfgj.get("dtype") == "bfloat16", cfgj.get("dtype")

    # expected: load the bf16 checkpoint, upcast to f32, run in f32
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, **LOAD_KW).eval()
    for k, v in m.state_dict().items():
        assert v.dtype == torch.bfloat16, k
        assert torch.equal(v, bf.state_dict()[k]), k
    m = m.float()
    results, moe_layers, gap, margin, stats = run_all(arch, m, cases)
    print(f"[qwen3_moe_sharded_bf16] min_topk_gap={gap:.4g} argmax_margin={margin:.4g}")
    assert gap > GAP_MIN and margin > GAP_MIN, "bf16 variant has near-ties; pick another qwen3 seed"
    for c, r in zip(cases, results):
        check_generate(m, c["input_ids"], r["generated_ids"])
    save_tokenizer(tok, add_bos, d)
    exp = header(
        arch,
        m.config,
        seed,
        moe_layers,
        gap,
        margin,
        "bfloat16 (upcast to float32 before running)",
        stats,
        {"variant": "qwen3_moe_sharded_bf16"},
    )
    exp["prompts"] = results
    dump_json(os.path.join(d, "expected.json"), exp)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(repo, "inference", "tests", "fixtures", "hf"))
    ap.add_argument("--arch", action="append", help="only build these fixtures (default: all, RoPE variants included)")
    args = ap.parse_args()
    setup_torch()
    transformers.logging.set_verbosity_error()
    os.makedirs(args.out, exist_ok=True)
    for name in args.arch or list(ARCHS) + list(VARIANTS) + list(SLIDING):
        build_arch(name, args.out)
    total = 0
    for root, _, fs in sorted(os.walk(args.out)):
        for f in sorted(fs):
            p = os.path.join(root, f)
            total += os.path.getsize(p)
            print(f"{os.path.getsize(p):>9}  {sha(p)}  {os.path.relpath(p, args.out)}")
    print(f"{total:>9}  total")


if __name__ == "__main__":
    sys.exit(main())
