#!/usr/bin/env python3
"""Writes routing fixtures in the exact layouts inference engines emit, from a known,
seeded routing, plus expected.json with that routing, for datasets/tests/engines.rs.

Layouts (read from the engines' sources, see README "Importing from engines"):
- vLLM >= 0.22 (`enable_return_routed_experts`): completion response, each
  `choices[i].routed_experts` = base64 of an `np.save` .npy file, shape
  (prompt + generated - 1, num_hidden_layers, top_k), uint8 when E <= 256; dense layers
  are never written (zeros).
- vLLM 0.21 / routed-experts replay doc: top-level `prompt_routed_experts`
  [prompt_len, moe_layers, k] and `choices[0].routed_experts` [gen_len, moe_layers, k]
  as JSON nested lists (int16), -1 for prefix-cached positions.
- vLLM offline: a bare .npy (int32) saved from `RequestOutput.routed_experts`.
- SGLang (`--enable-return-routed-experts`): `meta_info.routed_experts` = base64 of raw
  row-major int32 (or `meta_info.routed_experts_dtype`), shape
  (prompt + output - 1, num_hidden_layers * top_k).
- Megatron-LM (`--moe-routing-trace-path`): router_trace_rank{N}.jsonl, one line per
  (step, block, layer) with `top_indices` [num_tokens][topk] (ids ascending), and
  hidden_states_rank{N}.bin (bf16 [num_tokens, hidden] at `hs_offset`) and
  logits_rank{N}.bin (bf16 [num_tokens, num_experts] at `logit_offset`). Two
  tensor-parallel ranks write identical records.

- SGLang expert-distribution recorder (`per_token`): `torch.save` dumps, one per rank.

Run: python3 tools/engine_fixtures.py  (needs numpy and torch)
"""
import base64
import io
import json
import os

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "datasets", "tests", "fixtures", "engines")
rng = np.random.default_rng(7)
E, K, LAYERS = 16, 2, 4          # experts, top-k, hidden layers
DENSE = [0]                       # layer 0 is dense (first_k_dense_replace = 1)
MOE = [l for l in range(LAYERS) if l not in DENSE]
HIDDEN = 8


def routing(tokens):
    """[tokens][moe layer][k] distinct ids in rank order."""
    return [[[int(x) for x in rng.choice(E, K, replace=False)] for _ in MOE] for _ in range(tokens)]


def all_layers(r):
    """[tokens, LAYERS, K] with dense layers left at zero, as vLLM's buffer."""
    a = np.zeros((len(r), LAYERS, K), dtype=np.int64)
    for t, per in enumerate(r):
        for m, l in enumerate(MOE):
            a[t, l] = per[m]
    return a


def npy_b64(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return base64.b64encode(buf.getvalue()).decode()


expected = {"n_experts": E, "top_k": K, "n_layers": LAYERS, "moe_layers": MOE, "sequences": {}}
os.makedirs(OUT, exist_ok=True)

# vLLM >= 0.22 completion response, two choices.
prompt = [11, 12, 13, 14, 15]
choices = []
for i, gen in enumerate([[21, 22, 23, 24], [31, 32, 33]]):
    r = routing(len(prompt) + len(gen) - 1)
    choices.append({
        "index": i, "text": "", "finish_reason": "length", "token_ids": gen,
        "prompt_token_ids": prompt, "routed_experts": npy_b64(all_layers(r).astype(np.uint8)),
    })
    expected["sequences"][f"vllm_response#c{i}"] = {"tokens": (prompt + gen)[: len(r)], "prompt_len": len(prompt), "routing": r}
with open(os.path.join(OUT, "vllm_response.json"), "w") as f:
    json.dump({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny",
               "choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": 7}}, f)

# vLLM 0.21 split layout, MoE layers only, int16 lists, the first 2 prompt tokens cached.
p_r, g_r = routing(4), routing(3)
p_list = [[[-1] * K for _ in MOE] if t < 2 else p_r[t] for t in range(4)]
with open(os.path.join(OUT, "vllm_split.json"), "w") as f:
    json.dump({"id": "cmpl-2", "prompt_routed_experts": p_list,
               "choices": [{"index": 0, "text": "", "routed_experts": g_r}]}, f)
expected["sequences"]["vllm_split"] = {"tokens": None, "prompt_len": 4,
                                       "routing": [None, None] + p_r[2:] + g_r}

# vLLM offline: bare int32 .npy over all layers.
r = routing(6)
np.save(os.path.join(OUT, "vllm_offline.npy"), all_layers(r).astype(np.int32))
expected["sequences"]["vllm_offline"] = {"tokens": None, "prompt_len": None, "routing": r}

# SGLang /generate response: raw int32, rows x (LAYERS * K).
r = routing(5)
raw = all_layers(r).astype(np.int32).reshape(len(r), LAYERS * K)
with open(os.path.join(OUT, "sglang_response.json"), "w") as f:
    json.dump({"text": "", "output_ids": [41, 42, 43],
               "meta_info": {"id": "abc", "prompt_tokens": 3, "completion_tokens": 3,
                             "routed_experts": base64.b64encode(raw.tobytes()).decode()}}, f)
expected["sequences"]["sglang_response"] = {"tokens": None, "prompt_len": 3, "routing": r}

# Megatron-LM: one step of 6 tokens, MoE layers numbered as the hook path does (local,
# 0-based over all layers), ids ascending; ranks 0 and 1 are tensor-parallel twins.
mdir = os.path.join(OUT, "megatron")
os.makedirs(mdir, exist_ok=True)
r = routing(6)
hs = rng.standard_normal((len(MOE), 6, HIDDEN)).astype(np.float32)
bf16 = (hs.view(np.uint32) >> 16).astype(np.uint16)  # truncation to bf16
lg = rng.standard_normal((len(MOE), 6, E)).astype(np.float32)
lg16 = (lg.view(np.uint32) >> 16).astype(np.uint16)
for rank in (0, 1):
    offset = loffset = 0
    with open(os.path.join(mdir, f"router_trace_rank{rank}.jsonl"), "w") as lines, \
            open(os.path.join(mdir, f"hidden_states_rank{rank}.bin"), "wb") as side, \
            open(os.path.join(mdir, f"logits_rank{rank}.bin"), "wb") as lside:
        for m, l in enumerate(MOE):
            top = [sorted(r[t][m]) for t in range(6)]
            data, ldata = bf16[m].tobytes(), lg16[m].tobytes()
            side.write(data)
            lside.write(ldata)
            lines.write(json.dumps({"step": 1, "stage": "pre_dispatch", "block": "decoder", "layer": l,
                                    "rank": rank, "num_tokens": 6, "topk": K, "top_indices": top,
                                    "hs_offset": offset, "hs_bytes": len(data), "hs_shape": [6, HIDDEN],
                                    "logit_offset": loffset, "logit_bytes": len(ldata),
                                    "logit_shape": [6, E]}) + "\n")
            offset += len(data)
            loffset += len(ldata)
expected["sequences"]["megatron"] = {"tokens": None, "prompt_len": None,
                                     "routing": [[sorted(x) for x in per] for per in r],
                                     "router_inputs_bf16": bf16.transpose(1, 0, 2).tolist(),
                                     "router_logits_bf16": lg16.transpose(1, 0, 2).tolist()}

# SGLang expert-distribution recorder, `per_token` mode (torch.save dump per rank):
# records of forward passes with input_ids / positions / extend_seq_lens and
# topk_ids_of_layer [layers, tokens, 8] of PHYSICAL ids (-1 = unused slot; the dense
# layer 0 is never written), plus last_physical_to_logical_map [layers, physical]
# (logical experts 0..3 have a second replica at physical 16..19). Ranks 0 and 1 are
# tensor-parallel twins. The schedule: A and B prefill together, decode twice, C
# prefills in two chunks, all three decode, D prefills from a cached prefix (position
# 3), B finishes, then a MIXED pass holds A's decode token and E's prefill, and F
# prefills from a cached prefix at position 8, where finished B would have gone on.
import torch  # noqa: E402  (only this fixture needs torch)

SLOTS, PHYS = 8, E + 4
phys_to_log = list(range(E)) + [0, 1, 2, 3]
schedule = [
    (1, [("A", 0, 5), ("B", 0, 5)]),
    (2, [("A", 5, 1), ("B", 5, 1)]),
    (2, [("A", 6, 1), ("B", 6, 1)]),
    (1, [("C", 0, 4)]),
    (1, [("C", 4, 2)]),
    (2, [("A", 7, 1), ("B", 7, 1), ("C", 6, 1)]),
    (1, [("D", 3, 4)]),
    (2, [("A", 8, 1), ("C", 7, 1), ("D", 7, 1)]),
    (3, [("A", 9, 1), ("E", 0, 3)]),
    (1, [("F", 8, 2)]),
]
order = ["A", "B", "C", "D", "E", "F"]
seqs = {name: {"positions": [], "tokens": [], "phases": [], "routing": []} for name in order}
records = []
for fp, (mode, segs) in enumerate(schedule):
    ids, pos, lens, rows = [], [], [], []
    for name, start, n in segs:
        lens.append(n)
        for p in range(start, start + n):
            tok = 100 * (order.index(name) + 1) + p
            r = routing(1)[0]
            phys = []
            for per in r:
                phys.append([x + E if x < 4 and rng.random() < 0.5 else x for x in per])
            ids.append(tok)
            pos.append(p)
            rows.append(phys)
            s = seqs[name]
            decode = mode == 2 or (mode == 3 and n == 1)
            s["positions"].append(p)
            s["tokens"].append(tok)
            s["phases"].append("decode" if decode else "prefill")
            s["routing"].append(r)
    topk = torch.full((LAYERS, len(ids), SLOTS), -1, dtype=torch.int32)
    for t, phys in enumerate(rows):
        for m, l in enumerate(MOE):
            topk[l, t, :K] = torch.tensor(phys[m], dtype=torch.int32)
    count = torch.zeros((LAYERS, PHYS), dtype=torch.int32)
    records.append(dict(forward_pass_id=fp, input_ids=ids, positions=pos,
                        extend_seq_lens=None if mode == 2 else lens, forward_mode=mode,
                        topk_ids_of_layer=topk, misc_objects=[], global_physical_count=count))
sdir = os.path.join(OUT, "sglang_dump")
os.makedirs(sdir, exist_ok=True)
pmap = torch.tensor([phys_to_log] * LAYERS, dtype=torch.int64)
for rank in (0, 1):
    recs = [dict(r, rank=rank, gatherer_key="primary") for r in records]
    torch.save(dict(records=recs, last_physical_to_logical_map=pmap),
               os.path.join(sdir, f"expert_distribution_recorder_1700000000.5_{rank}.pt"))
expected["sglang_dump"] = {f"rank0/req{i}": seqs[name] for i, name in enumerate(order)}
# Bad dumps: a physical id beyond the map, and a torch file that is no dump.
bad = dict(records[0], rank=0, topk_ids_of_layer=records[0]["topk_ids_of_layer"].clone())
bad["topk_ids_of_layer"][1, 0, 0] = PHYS + 5
torch.save(dict(records=[bad], last_physical_to_logical_map=pmap), os.path.join(OUT, "sglang_bad_physical.pt"))
torch.save(dict(weights=torch.zeros(3)), os.path.join(OUT, "sglang_not_a_dump.pt"))

with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1)
print("wrote", OUT)
