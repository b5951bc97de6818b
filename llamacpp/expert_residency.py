"""Expert residency inside llama.cpp: which experts' byte ranges of the memory-mapped GGUF
are in the page cache, a bounded resident set (least recently used out), and greedy
decoding that stages the experts a moecast predictor forecasts. See moecast_llamacpp.py.
"""

import ctypes
import ctypes.util
import mmap
import os
import time
from collections import OrderedDict

import numpy as np

from moecast_llamacpp import LlamaCppError, sample

_PAGE = mmap.PAGESIZE
_MADV_RANDOM, _MADV_DONTNEED, _MADV_NOHUGEPAGE = 1, 4, 15


class _Libc:
    def __init__(self):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.c = libc

    def madvise(self, addr, length, advice):
        if self.c.madvise(addr, length, advice) != 0:
            e = ctypes.get_errno()
            raise LlamaCppError(f"madvise({advice}) failed: {os.strerror(e)}")

    def resident_pages(self, addr, length):
        n = (length + _PAGE - 1) // _PAGE
        vec = (ctypes.c_ubyte * n)()
        if self.c.mincore(addr, length, vec) != 0:
            raise LlamaCppError(f"mincore failed: {os.strerror(ctypes.get_errno())}")
        return sum(v & 1 for v in vec), n


class FileMapping:
    """This process's mappings of a file (llama.cpp maps the GGUF's tensor data): file
    offset -> address."""

    def __init__(self, path):
        real = os.path.realpath(path)
        self.segments = []  # (file offset, length, address)
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() == real:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    self.segments.append((int(parts[2], 16), hi - lo, lo))
        if not self.segments:
            raise LlamaCppError(f"{path}: llama.cpp has not memory-mapped the file (use_mmap off?)")
        self.path = path

    def addrs(self, off, length):
        """The address of the file bytes off..off+length in every mapping that holds them."""
        out = [lo + off - start for start, n, lo in self.segments if start <= off and off + length <= start + n]
        if not out:
            raise LlamaCppError(f"{self.path}: bytes {off}..{off + length} are not in llama.cpp's mapping")
        return out


class ExpertResidency:
    """Which experts' byte ranges of the GGUF are in the page cache: at most `capacity`
    experts kept, of which `staging_slots` hold staged experts not used yet (oldest
    dropped when a newer one is staged: a forecast can never push out more than those
    slots of what demand paging keeps) and the rest the experts used (least recently used
    dropped); counts of what was resident when used, staged and wasted. Reads and drops
    are issued from the calling thread (an I/O thread was slower here: it contends with
    llama.cpp's eval callback for Python's GIL)."""

    def __init__(self, experts, capacity, staging_slots=0):
        if not 0 <= staging_slots < capacity:
            raise LlamaCppError(f"{staging_slots} staging slots do not fit a resident set of {capacity} experts")
        self.ex = experts
        self.capacity = capacity
        self.slots = staging_slots
        self.staging = OrderedDict()  # staged, not used yet; oldest first
        if not experts.page_aligned:
            raise LlamaCppError(
                f"{experts.path}: expert slices do not start and end on page boundaries, so one expert cannot "
                "be dropped without its neighbour; export with llamacpp/export_gguf.py (4096-byte alignment)")
        self.mapping = FileMapping(experts.path)
        self.fd = os.open(experts.path, os.O_RDONLY)
        self.libc = _Libc()
        self.lru = OrderedDict()  # (moe index, expert) used; least recently used first
        self.uses = self.resident_uses = 0
        self.bytes_staged = self.bytes_wasted = self.bytes_demand = 0
        self.staged = self.staged_used = self.late = 0
        # A fault reads only its own page: without both, this kernel's read-around (up to a
        # 2 MB folio per fault, seen on Linux 6.18 / ext4) loads a dozen neighbouring
        # experts with every miss, and no expert-sized residency could be kept.
        for _, n, lo in self.mapping.segments:
            self.libc.madvise(lo, n, _MADV_RANDOM)
            try:  # kernels without transparent huge pages refuse it and need it not
                self.libc.madvise(lo, n, _MADV_NOHUGEPAGE)
            except LlamaCppError:
                pass

    def close(self):
        os.close(self.fd)

    def _ranges(self, key):
        i, e = key
        return self.ex.ranges[self.ex.moe_layers[i]][e]

    def _bytes(self, key):
        return sum(n for _, n in self._ranges(key))

    def drop_all(self):
        """The whole file out of the page cache. Whole, not expert by expert: the pages
        written by the export or read at load sit in large folios that straddle expert
        and dense ranges, which the kernel only drops whole; once out, pages come back
        one fault at a time (see __init__) and experts can be dropped one by one."""
        for _, n, lo in self.mapping.segments:
            self.libc.madvise(lo, n, _MADV_DONTNEED)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.lru.clear()
        self.staging.clear()
        held = sum(self.is_resident((i, e)) for i in range(len(self.ex.moe_layers)) for e in range(self.ex.n_experts))
        if held:
            raise LlamaCppError(
                f"{self.ex.path}: {held} experts stayed in memory after the file was dropped from the page cache "
                "(a tmpfs such as /dev/shm keeps them): put the GGUF on a disk-backed file system")

    def _drop(self, key):
        for off, n in self._ranges(key):
            start = off // _PAGE * _PAGE
            length = off + n - start
            for a in self.mapping.addrs(start, length):
                self.libc.madvise(a, length, _MADV_DONTNEED)
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)

    def _read(self, key):
        for off, n in self._ranges(key):
            os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_WILLNEED)

    def is_resident(self, key):
        have = total = 0
        for off, n in self._ranges(key):
            start = off // _PAGE * _PAGE
            h, t = self.libc.resident_pages(self.mapping.addrs(start, off + n - start)[0], off + n - start)
            have, total = have + h, total + t
        return have == total

    def use(self, i, experts, count=True):
        """Layer i is about to run `experts`: counts residency, reads the missing ones
        whole (one request per slice, as an offloading runtime loads an expert on a miss,
        instead of a fault per page), marks them used."""
        keys = [(i, int(e)) for e in experts]
        for key in keys:
            resident = self.is_resident(key)
            if not resident:
                self._read(key)
            staged = self.staging.pop(key, None) is not None
            if staged:
                self.staged_used += 1
            self.lru.pop(key, None)
            self.lru[key] = True
            if count:
                self.uses += 1
                if resident:
                    self.resident_uses += 1
                elif staged:  # its read was issued early but has not landed: not read twice
                    self.late += 1
                else:
                    self.bytes_demand += self._bytes(key)
        self._evict(set(keys))

    def stage(self, i, experts):
        """Asks the kernel to read these experts of layer i (not already held)."""
        for e in experts:
            key = (i, int(e))
            if key in self.lru or key in self.staging:
                continue
            self._read(key)
            self.staging[key] = True
            self.staged += 1
            self.bytes_staged += self._bytes(key)
            while len(self.staging) > self.slots:
                old, _ = self.staging.popitem(last=False)
                self.bytes_wasted += self._bytes(old)
                self._drop(old)

    def _evict(self, keep):
        while len(self.lru) > self.capacity - self.slots:
            key = next((k for k in self.lru if k not in keep), None)
            if key is None:
                return
            del self.lru[key]
            self._drop(key)

    def finish(self):
        """Staged experts never used count as wasted."""
        self.bytes_wasted += sum(self._bytes(k) for k in self.staging)
        self.staging.clear()

    def report(self):
        return {
            "routed_uses": self.uses,
            "resident_when_used": self.resident_uses / max(self.uses, 1),
            "late_staged": self.late / max(self.uses, 1),
            "bytes_demand": self.bytes_demand,
            "bytes_staged": self.bytes_staged,
            "bytes_wasted": self.bytes_wasted,
            "staged_experts": self.staged,
            "staged_used": self.staged_used / max(self.staged, 1),
        }


def decode_with_residency(model, prompts, capacity, max_new_tokens, predictor=None, budget=None,
                          temperature=0.0, seed=0, replay=None, replay_tokens=None, horizon=None):
    """Decoding with at most `capacity` experts resident: each prompt runs as one batch
    (it only warms the resident set), then up to `max_new_tokens` are decoded one at a
    time (greedy, or seeded sampling: sequence i draws with seed + i, so every mode decodes
    the same tokens). With `replay` (moecast.read_trace's dict of a trace with this
    model's MoE shape), every recorded sequence is decoded token by token from its own ids
    instead, each layer's routing forced to the recorded experts (up to `replay_tokens`
    tokens in all). With a moecast `predictor`, each token's layers are forecast from its
    id before it runs and the layers ahead after each layer routes, and their experts
    staged. Residency and time are counted over the decode steps."""
    m = len(model.experts.moe_layers)
    session = predictor.session() if predictor is not None else None
    horizon = min(horizon or predictor.horizon, predictor.horizon) if predictor is not None else 0
    budget = budget or (predictor.top_k if predictor is not None else 0)
    top_k = model.experts.top_k
    if capacity < top_k:
        raise LlamaCppError(f"a resident set of {capacity} experts cannot hold one layer's top-{top_k}")
    # the forecast for the layers ahead, and as many again still to be used; what demand
    # paging keeps never shrinks below one layer's experts
    slots = min(2 * budget * max(horizon, 1), capacity - top_k) if session else 0
    if session is not None and slots < 1:
        raise LlamaCppError(f"a resident set of {capacity} experts leaves no room to stage beside a layer's top-{top_k}")
    res = ExpertResidency(model.experts, capacity, slots)
    reads_inputs = bool(predictor is not None and predictor.router_input_dim)
    if reads_inputs and not model.router_inputs:
        raise LlamaCppError("this predictor reads router inputs: load the model with router_inputs=True")
    state = {"token": None, "so_far": [], "count": False, "forced": None, "prefill": False}

    def routed(i, ids):
        if state["prefill"]:  # the prompt's batch: every row's experts ran
            res.use(i, np.unique(ids), count=False)
            return
        res.use(i, ids[0], count=state["count"])
        state["so_far"].append(ids[0].astype(np.uint16))
        if session is not None and i + 1 < m and horizon > 0:
            x = model.rows["inputs"][i][-1][0] if reads_inputs else None
            ahead = session.predict_lookahead(state["token"], np.stack(state["so_far"]), budget, x)
            for h in range(min(horizon, m - i - 1)):
                res.stage(i + 1 + h, ahead[h][ahead[h] != 0xFFFF])

    def step(token, pos, count=True):
        """One decode step; returns its seconds."""
        state.update(token=token, so_far=[], count=count)
        t0 = time.perf_counter()
        if session is not None:
            first = session.predict_next(token, budget)
            for h in range(min(max(horizon, 1), m)):
                res.stage(h, first[h])
        model.decode([token], pos, all_logits=False)
        if session is not None:
            session.observe(token, np.stack(state["so_far"]))
        return time.perf_counter() - t0

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
            for tokens, experts in replay_sequences(replay, model, m):
                model.clear()
                if session is not None:
                    session.reset()
                for pos, tok in enumerate(tokens[: model.n_ctx]):
                    if replay_tokens is not None and steps >= replay_tokens:
                        break
                    state["forced"] = experts[pos]
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
    out.update(decode_steps=steps, tokens_per_s=steps / decode_s if decode_s > 0 else 0.0)
    return out


def replay_sequences(trace, model, m):
    """[(token ids, experts [tokens, m, k])] of every sequence of a trace whose tokens all
    carry an id and routing; the trace must have the model's MoE shape."""
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
        ok = (tokens >= 0) & (tokens < model.n_vocab) & (experts < ex.n_experts).all(axis=(1, 2))
        if not ok.all():  # cut at the first token without an id or routing
            cut = int(np.argmin(ok))
            tokens, experts = tokens[:cut], experts[:cut]
        if len(tokens) > 1:
            out.append(([int(t) for t in tokens], experts.astype(np.int32)))
    return out
