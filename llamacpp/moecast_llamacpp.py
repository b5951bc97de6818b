#!/usr/bin/env python3
"""moecast inside llama.cpp (through llama-cpp-python): record each token's routed experts
from llama.cpp's eval callback, and stage the experts a moecast predictor forecasts in
the memory-mapped GGUF file.

    # routing of llama.cpp's own run, as moecast's interchange JSONL (source: llama.cpp)
    python3 llamacpp/moecast_llamacpp.py collect --model tiny.gguf --prompts prompts/demo.txt \
        --max-new-tokens 32 -o llama.jsonl          # then: moecast trace convert llama.jsonl -o llama.mctrace
    # decode with a bounded set of resident experts, with and without the predictor
    python3 llamacpp/moecast_llamacpp.py prefetch --model tiny.gguf --predictor runs/llama/predictor \
        --prompts prompts/heldout.txt --resident 25% --json prefetch.json

How it works. llama.cpp calls ``cb_eval`` for every graph node; moecast asks for the
nodes named ``ffn_moe_topk-N`` (the router's top-k ids of layer N, in rank order),
``ffn_moe_weights_norm-N`` (their weights), with ``--router-logits`` ``ffn_moe_logits-N``
and with ``--router-inputs`` ``ffn_norm-N`` (the normed hidden state the router reads),
and reads them when they are computed, before the layer's experts run. For prefetch, the same moment is when the layers ahead are forecast and their
experts' byte ranges of the GGUF (each expert's slice of ``ffn_{gate,up,down}_exps``) are
staged with ``posix_fadvise(WILLNEED)``; residency is read with ``mincore`` on llama.cpp's
own mapping of the file (found in ``/proc/self/maps``) just before the experts are used.
A resident set of ``--resident`` experts is kept (least frequently used out, ``--eviction``; dropped with
``madvise(DONTNEED)`` on the mapping and ``posix_fadvise(DONTNEED)`` on the file), so the
page cache plays the role of fast memory and the GGUF file the role of the SSD.

Needs llama-cpp-python, gguf and numpy; ``prefetch`` also moecast's Python package
(``pip install ./python``). Linux only (``/proc``, ``mincore``).
"""

import argparse
import ctypes
import json
import os
import re
import sys
import time

import numpy as np

# kind -> llama.cpp graph node, per layer N: "<node>-N"; every one is [width, n_tokens]
_NODES = {
    "topk": "ffn_moe_topk",  # the router's top-k ids, in rank order
    "weights": "ffn_moe_weights_norm",  # their weights, renormalised
    "logits": "ffn_moe_logits",  # the router's logits (--router-logits)
    "inputs": "ffn_norm",  # the router's input, the normed hidden state (--router-inputs)
}
_F32, _I32 = 0, 26  # ggml_type
_KIND = {v.encode(): k for k, v in _NODES.items()}
_NODE = re.compile(rb"^(" + b"|".join(_KIND) + rb")-(\d+)$")


class LlamaCppError(Exception):
    """Something llama.cpp or the input refused, with the file and the reason."""


class _GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of the ggml llama-cpp-python 0.3.36 vendors (checked at run
    time against ``ggml_get_name``)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _ggml():
    from llama_cpp._ggml import libggml

    libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    libggml.ggml_get_name.restype = ctypes.c_char_p
    libggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    libggml.ggml_backend_tensor_get.restype = None
    libggml.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    libggml.ggml_backend_tensor_set.restype = None
    return libggml


class GgufExperts:
    """The MoE shape of a GGUF file and each expert's byte ranges in it."""

    def __init__(self, path):
        import gguf

        self.path = os.path.realpath(path)
        try:
            r = gguf.GGUFReader(self.path)
        except (OSError, ValueError) as e:
            raise LlamaCppError(f"{path}: not a readable GGUF file: {e}") from None

        def field(key):
            f = r.fields.get(key)
            if f is None:
                raise LlamaCppError(f"{path}: GGUF key {key} missing")
            return f.contents()

        self.arch = field("general.architecture")
        self.n_layers = int(field(f"{self.arch}.block_count"))
        self.n_experts = int(field(f"{self.arch}.expert_count"))
        self.top_k = int(field(f"{self.arch}.expert_used_count"))
        self.model_name = r.fields["general.name"].contents() if "general.name" in r.fields else os.path.basename(path)
        tensors = {t.name: t for t in r.tensors}
        self.moe_layers = [l for l in range(self.n_layers) if f"blk.{l}.ffn_gate_exps.weight" in tensors]
        if not self.moe_layers:
            raise LlamaCppError(f"{path}: no ffn_gate_exps tensors: not an MoE model")
        # ranges[l][e] = [(file offset, bytes)] of expert e's slices in layer l
        self.ranges = {}
        for l in self.moe_layers:
            per = [[] for _ in range(self.n_experts)]
            for part in ("gate", "up", "down"):
                t = tensors.get(f"blk.{l}.ffn_{part}_exps.weight")
                if t is None:
                    raise LlamaCppError(f"{path}: tensor blk.{l}.ffn_{part}_exps.weight missing")
                size = int(t.n_bytes) // self.n_experts
                for e in range(self.n_experts):
                    per[e].append((int(t.data_offset) + e * size, size))
            self.ranges[l] = per
        self.expert_bytes = [sum(n for _, n in self.ranges[l][0]) for l in self.moe_layers]
        self.page_aligned = all(off % 4096 == 0 and n % 4096 == 0
                                for per in self.ranges.values() for r in per for off, n in r)
        tensors = r = None  # the reader's own mapping of the file must not keep pages in memory


class LlamaCppModel:
    """A GGUF model loaded by llama.cpp with moecast's eval callback installed."""

    def __init__(self, path, n_ctx=0, threads=1, router_logits=False, router_inputs=False):
        import llama_cpp

        self.lc = llama_cpp
        self.path = path
        if not os.path.exists(path):
            raise LlamaCppError(f"{path}: no such file")
        self.experts = GgufExperts(path)
        self.layer_of = {l: i for i, l in enumerate(self.experts.moe_layers)}
        self.router_logits = router_logits
        self.router_inputs = router_inputs
        self.kinds = {"topk", "weights"} | ({"logits"} if router_logits else set()) | (
            {"inputs"} if router_inputs else set())
        self.ggml = _ggml()
        self._checked = False
        self.error = None
        self.on_routed = None  # fn(moe index, ids [n_tokens, k]) after a layer's top-k
        self.force = None  # fn(moe index, n_tokens) -> ids [n_tokens, k] to route to instead
        self.rows = None
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        # Weights stay in the memory-mapped file, on the CPU, in the file's own layout
        # (no repacking into other buffers): what the residency of experts is read from.
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False
        _LOG.clear()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            why = f": {_LOG[-1].strip()}" if _LOG else ""
            raise LlamaCppError(f"{path}: llama.cpp could not load the model{why}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        cp = llama_cpp.llama_context_default_params()
        self.n_ctx = n_ctx or min(llama_cpp.llama_model_n_ctx_train(self.model), 4096)
        cp.n_ctx = cp.n_batch = cp.n_ubatch = self.n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._callback)
        cp.cb_eval = self._cb
        cp.cb_eval_user_data = None
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise LlamaCppError(f"{path}: llama.cpp could not create a context")
        self.batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)

    @property
    def threads(self):
        """llama.cpp's threads for the next decode."""
        return self.lc.llama_n_threads(self.ctx)

    def set_threads(self, n):
        """Runs the next decodes on `n` threads."""
        if n != self.threads:
            self.lc.llama_set_n_threads(self.ctx, n, n)

    def close(self):
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)

    def tokenize(self, text, add_special=False):
        b = text.encode()
        buf = (self.lc.llama_token * (len(b) + 8))()
        n = self.lc.llama_tokenize(self.vocab, b, len(b), buf, len(buf), add_special, True)
        if n < 0:
            raise LlamaCppError(f"tokenizing {text[:40]!r}: llama.cpp needs {-n} tokens")
        return list(buf[:n])

    def is_eog(self, token):
        return bool(self.lc.llama_vocab_is_eog(self.vocab, token))

    # -- the eval callback ---------------------------------------------------------------

    def _callback(self, t, ask, _user):
        try:
            name = self.ggml.ggml_get_name(t)
            m = _NODE.match(name)
            if m is None or self.rows is None:
                return False if ask else True
            kind, layer = _KIND[m.group(1)], int(m.group(2))
            if kind not in self.kinds:
                return False if ask else True
            if ask:
                return True
            tensor = _GgmlTensor.from_address(t)
            if not self._checked:
                if tensor.name != name:
                    raise LlamaCppError("ggml_tensor layout differs from this llama-cpp-python version's")
                self._checked = True
            self._read(kind, layer, t, tensor)
        except BaseException as e:  # no exception may unwind through llama.cpp
            if self.error is None:
                self.error = e
        return True

    def _read(self, kind, layer, t, tensor):
        if layer not in self.layer_of:
            return
        i = self.layer_of[layer]
        # [width, n_tokens] rows, dims above 1
        width, n = int(tensor.ne[0]), int(tensor.ne[1])
        if tensor.ne[2] != 1 or tensor.ne[3] != 1:
            raise LlamaCppError(f"{tensor.name.decode()}: unexpected shape {list(tensor.ne)}")
        dtype, want = (np.int32, _I32) if kind == "topk" else (np.float32, _F32)
        if tensor.type != want:
            raise LlamaCppError(f"{tensor.name.decode()}: ggml type {tensor.type}, expected {want}")
        out = np.empty((n, width), dtype=dtype)
        row_stride = int(tensor.nb[1])
        for r in range(n):
            self.ggml.ggml_backend_tensor_get(t, out[r].ctypes.data, r * row_stride, width * 4)
        if kind == "topk" and self.force is not None:
            out = np.ascontiguousarray(self.force(i, n), dtype=np.int32)
            if out.shape != (n, width) or out.min() < 0 or out.max() >= self.experts.n_experts:
                raise LlamaCppError(f"forced routing of layer {layer}: {out.shape} ids, expected {(n, width)}")
            for r in range(n):
                self.ggml.ggml_backend_tensor_set(t, out[r].ctypes.data, r * row_stride, width * 4)
        self.rows[kind][i].append(out)
        if kind == "topk" and self.on_routed is not None:
            self.on_routed(i, out)

    # -- decoding ------------------------------------------------------------------------

    def decode(self, tokens, start, all_logits):
        """Runs `tokens` at positions start.. through the model; returns the decode's
        routing {kind: [per MoE layer: array [n_tokens, width]]}."""
        lc, b = self.lc, self.batch
        if start + len(tokens) > self.n_ctx:
            raise LlamaCppError(f"sequence of {start + len(tokens)} tokens exceeds the context ({self.n_ctx})")
        for j, tok in enumerate(tokens):
            if not 0 <= tok < self.n_vocab:
                raise LlamaCppError(f"token id {tok} outside the vocabulary ({self.n_vocab})")
            b.token[j] = tok
            b.pos[j] = start + j
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = 0
            b.logits[j] = all_logits or j == len(tokens) - 1
        b.n_tokens = len(tokens)
        n = len(self.experts.moe_layers)
        self.rows = {k: [[] for _ in range(n)] for k in _NODES}
        self.error = None
        rc = lc.llama_decode(self.ctx, b)
        rows, self.rows = self.rows, None
        if isinstance(self.error, LlamaCppError):
            raise self.error
        if self.error is not None:
            raise LlamaCppError(f"in llama.cpp's eval callback: {type(self.error).__name__}: {self.error}") from self.error
        if rc != 0:
            raise LlamaCppError(f"llama_decode returned {rc}")
        return {k: [np.concatenate(v) if v else None for v in per] for k, per in rows.items()}

    def last_logits(self):
        p = self.lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy()

    def clear(self):
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)


_LOG = []  # llama.cpp's last warnings and errors, for messages


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _QUIET(level, text, user):
    if level >= 3:  # WARN and ERROR
        _LOG.append(text.decode(errors="replace"))
        del _LOG[:-8]
        if os.environ.get("MOECAST_LLAMA_LOG"):
            sys.stderr.write(_LOG[-1])


_PROMPT_KEYS = {"id", "name", "text", "prompt", "token_ids", "domain"}


def read_prompts(path, model, add_special=False):
    """[(name, token ids)] of a .txt (one prompt per line) or .jsonl prompt file (objects
    with exactly one of "text"/"prompt" and "token_ids", optionally "id"/"name" and
    "domain"), named as `moecast collect` names them; errors name the file and line."""
    out = []
    try:
        f = open(path)
    except OSError as e:
        raise LlamaCppError(f"{path}: {e}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            name = f"p{len(out):03}"
            if path.endswith(".jsonl"):
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise LlamaCppError(f"{where}: not JSON: {e}") from None
                if not isinstance(obj, dict):
                    raise LlamaCppError(f"{where}: expected a JSON object")
                unknown = set(obj) - _PROMPT_KEYS
                if unknown:
                    raise LlamaCppError(f"{where}: unknown field {sorted(unknown)[0]!r}")
                given = obj.get("id", obj.get("name"))
                if given is not None:
                    name = given if isinstance(given, str) else json.dumps(given)
                elif obj.get("domain"):
                    name = f"{name}-{obj['domain']}"
                text = obj.get("text", obj.get("prompt"))
                ids = obj.get("token_ids")
                if (text is None) == (ids is None):
                    raise LlamaCppError(f"{where}: give exactly one of \"text\" and a non-empty \"token_ids\"")
                if ids is not None:
                    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                        raise LlamaCppError(f"{where}: token_ids must be a list of integers")
                    bad = [i for i in ids if not 0 <= i < model.n_vocab]
                    if bad:
                        raise LlamaCppError(f"{where}: token id {bad[0]} outside the vocabulary ({model.n_vocab})")
                elif not isinstance(text, str):
                    raise LlamaCppError(f"{where}: \"text\" must be a string")
                else:
                    ids = model.tokenize(text, add_special)
            else:
                ids = model.tokenize(line, add_special)
            if not ids:
                raise LlamaCppError(f"{where}: the prompt has no tokens")
            if len(ids) > model.n_ctx:
                raise LlamaCppError(f"{where}: {len(ids)} tokens exceed the context ({model.n_ctx}; --ctx)")
            out.append((name, ids))
    if not out:
        raise LlamaCppError(f"{path}: no prompts")
    return out


def sample(logits, temperature, rng):
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


# -- collect --------------------------------------------------------------------------------


def collect(model, prompts, out_path, max_new_tokens=32, samples=1, temperature=0.0, seed=0,
            stop_at_eos=False, progress=None):
    """Runs every prompt in llama.cpp (prompt in one batch, then one token per step) and
    writes each forwarded token's routing as interchange JSONL, atomically. Returns the
    number of tokens written."""
    ex = model.experts
    meta = {
        "model": ex.model_name,
        "architecture": ex.arch,
        "n_layers": ex.n_layers,
        "moe_layers": ex.moe_layers,
        "n_experts": ex.n_experts,
        "top_k": ex.top_k,
        "n_shared_experts": 0,
        "source": "llama.cpp",
        "ranked": True,
        "expert_bytes": ex.expert_bytes,
        "channels": [],
    }
    if model.router_inputs:
        meta["channels"].append({"name": "router_inputs", "dtype": "f16", "width": model.n_embd})
    if model.router_logits:
        meta["channels"].append({"name": "router_logits", "dtype": "f32", "width": ex.n_experts})
    tmp = out_path + ".partial"
    try:
        written = _write_collection(model, prompts, tmp, meta, max_new_tokens, samples, temperature, seed,
                                    stop_at_eos, progress)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    os.replace(tmp, out_path)
    return written


def _write_collection(model, prompts, tmp, meta, max_new_tokens, samples, temperature, seed, stop_at_eos,
                      progress):
    written = 0
    with open(tmp, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        seq_index = 0
        for name, ids in prompts:
            for s in range(samples):
                seq = f"{name}#s{s}" if samples > 1 else name
                rng = np.random.default_rng(seed + seq_index)
                seq_index += 1
                tokens, routing = generate(model, ids, max_new_tokens, temperature, rng, stop_at_eos)
                for pos in range(len(routing)):
                    ids_row, w_row, logit_row, input_row = routing[pos]
                    rec = {
                        "seq": seq,
                        "pos": pos,
                        "phase": "prefill" if pos < len(ids) else "decode",
                        "token": tokens[pos],
                        "experts": ids_row,
                        "weights": w_row,
                    }
                    if model.router_logits:
                        rec["router_logits"] = logit_row
                    if model.router_inputs:
                        rec["router_inputs"] = input_row
                    f.write(json.dumps(rec) + "\n")
                written += len(routing)
                if progress:
                    progress(seq, len(tokens))
        f.flush()
        os.fsync(f.fileno())
    return written


def generate(model, prompt, max_new_tokens, temperature, rng, stop_at_eos):
    """(tokens, routing per forwarded position: (ids, weights, logits, router inputs), each
    per layer). The prompt runs as one batch with every row's output kept (so the last
    layer routes every prompt token); every sampled token is forwarded, as `moecast
    collect` does, so the last one has its routing too."""
    model.clear()
    tokens = list(prompt)
    per_pos = []

    def take(routing, n):
        for r in range(n):
            row = lambda kind: [
                (v[r].tolist() if v is not None and r < len(v) else None) for v in routing[kind]
            ]
            per_pos.append((row("topk"), _round(row("weights")), row("logits") if model.router_logits else None,
                            row("inputs") if model.router_inputs else None))

    take(model.decode(prompt, 0, all_logits=True), len(prompt))
    for _ in range(max_new_tokens):
        if len(tokens) >= model.n_ctx:
            break
        nxt = sample(model.last_logits(), temperature, rng)
        tokens.append(nxt)
        take(model.decode([nxt], len(tokens) - 1, all_logits=False), 1)
        if stop_at_eos and model.is_eog(nxt):
            break
    return tokens, per_pos


def _round(rows):
    return [[round(float(x), 7) for x in r] if r is not None else None for r in rows]


# -- command line ---------------------------------------------------------------------------


def cmd_collect(args):
    model = LlamaCppModel(args.model, n_ctx=args.ctx, threads=args.threads, router_logits=args.router_logits,
                          router_inputs=args.router_inputs)
    prompts = read_prompts(args.prompts, model, args.add_special_tokens)
    total = len(prompts) * args.samples
    done = [0]

    def progress(seq, n):
        done[0] += 1
        print(f"[{done[0]}/{total}] {seq}: {n} tokens", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    n = collect(model, prompts, args.output, args.max_new_tokens, args.samples, args.temperature,
                args.seed, args.stop_at_eos, progress if not args.quiet else None)
    dt = time.perf_counter() - t0
    print(f"collected {total} sequences ({n} routed tokens) in {dt:.2f}s from llama.cpp -> {args.output}")
    model.close()


def main(argv=None):
    sys.modules.setdefault("moecast_llamacpp", sys.modules[__name__])  # one LlamaCppError class
    ap = argparse.ArgumentParser(description="moecast inside llama.cpp: routing traces and predictor prefetch")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("collect", "prefetch"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="GGUF file")
        p.add_argument("--prompts", required=name == "collect",
                       help=".txt (one per line) or .jsonl (text/prompt/token_ids)")
        p.add_argument("--max-new-tokens", type=int, default=32)
        if name == "collect":
            p.add_argument("--threads", type=int, default=1)
        else:
            p.add_argument("--threads", help="N or N,M: llama.cpp's threads, and in the decode steps that forecast "
                           "(default: 1)")
        p.add_argument("--ctx", type=int, default=0, help="context length (default: the model's, at most 4096)")
        p.add_argument("--add-special-tokens", action="store_true", help="let the tokenizer add BOS")
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--seed", type=int, default=0, help="sequence i samples with seed + i")
    c = sub.choices["collect"]
    c.add_argument("-o", "--output", required=True, help="interchange JSONL to write")
    c.add_argument("--samples", type=int, default=1, help="sampled sequences per prompt")
    c.add_argument("--stop-at-eos", action="store_true", help="end a sequence at an end-of-generation token "
                   "(moecast collect does not)")
    c.add_argument("--router-logits", action="store_true", help="record ffn_moe_logits-N too")
    c.add_argument("--router-inputs", action="store_true", help="record each router's input (ffn_norm-N) too")
    c.add_argument("--quiet", action="store_true")
    f = sub.choices["prefetch"]
    f.add_argument("--predictor", help="moecast predictor directory (without: on-demand only)")
    f.add_argument("--resident", default="25%", help="experts kept resident: a count or a percentage")
    f.add_argument("--budget", default="auto,1",
                   help="comma-separated modes: auto (moecast's planner stages what is worth a read, from the "
                        "read and layer times it measures) and/or a fixed number of experts staged per "
                        "forecast layer")
    f.add_argument("--horizon", type=int, default=1,
                   help="fixed budgets: layers ahead to stage (at most the predictor's; the planner uses all)")
    f.add_argument("--read-us", type=float, help="the planner plans with this read time (microseconds per "
                   "expert) instead of measuring it; with --layer-us")
    f.add_argument("--layer-us", type=float, help="the planner plans with this time between two MoE layers "
                   "(microseconds) instead of measuring it; with --read-us")
    f.add_argument("--no-guard", action="store_true", help="planned prefetch in every decode step (by default "
                   "moecast's prefetch guard turns it off in windows of steps where it measures slower)")
    f.add_argument("--rounds", type=int, default=1, help="alternate the modes this many times")
    f.add_argument("--eviction", choices=["lfu", "lru", "next-use"], default="lfu",
                   help="which used expert every mode's resident set drops first: the least frequently used "
                        "(default), the least recently used, or the one expected latest (moecast's next-use "
                        "estimate)")
    f.add_argument("--replay", help="decode a trace's recorded sequences with their routing forced (instead of --prompts)")
    f.add_argument("--replay-tokens", type=int, help="with --replay: stop after this many decode steps")
    f.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "collect":
            cmd_collect(args)
        else:
            from prefetch_cmd import cmd_prefetch

            cmd_prefetch(args)
    except LlamaCppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
