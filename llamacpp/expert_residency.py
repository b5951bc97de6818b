"""Expert residency inside llama.cpp: which experts' byte ranges of the memory-mapped GGUF
are in the page cache, and a bounded resident set (least frequently used out) that stages
the experts a moecast predictor forecasts: a fixed budget per layer in staging slots of
their own, or what moecast's planner judges worth a read (``PlannedResidency``).
residency_decode.py decodes with it. See moecast_llamacpp.py.
"""

import ctypes
import ctypes.util
import math
import mmap
import os
import queue
import threading
import time
from collections import OrderedDict

import numpy as np

from moecast_llamacpp import LlamaCppError

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
        return int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1)), n


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


# LFU's half-life: a use's weight halves every this many tokens' worth of uses (MoE
# layers x top-k each): plain LFU keeps the experts of prompts long gone (on the shipped
# model at 25% it found fewer resident than LRU), LRU thrashes below a token's experts.
LFU_HALF_LIFE = 64
# The resident sets' evictions (ExpertResidency).
EVICTIONS = ("lfu", "lru", "next-use")


class ExpertResidency:
    """Which experts' byte ranges of the GGUF are in the page cache: at most `capacity`
    experts kept, of which `staging_slots` hold staged experts not used yet (oldest
    dropped when a newer one is staged: a forecast can never push out more than those
    slots of what demand paging keeps) and the rest the experts used, dropped by
    `eviction`: "lfu" the least frequently used (each use's weight halving every
    LFU_HALF_LIFE tokens' worth of uses, the least recent of equals; an expert's uses are
    kept when it is dropped), "lru" the least recently used, "next-use" the one expected
    latest (`moecast.NextUse`: its layer's gaps between an expert's uses and the expert's
    own use rate, as `moecast run --policy next-use`). A token visits every layer once, so
    under LRU a set smaller than a token's experts drops each layer's experts just before
    the layer comes round again. Counts what was resident when used, staged and wasted. Demand reads and
    drops are issued from the calling thread (the eval callback), staged reads from an
    I/O thread of their own: `posix_fadvise(WILLNEED)` returns only once its requests
    are queued on the device, which at production expert sizes blocked the callback for
    milliseconds per staged read."""

    def __init__(self, experts, capacity, staging_slots=0, eviction="lfu"):
        if not 0 <= staging_slots < capacity:
            raise LlamaCppError(f"{staging_slots} staging slots do not fit a resident set of {capacity} experts")
        if eviction not in EVICTIONS:
            raise LlamaCppError(f"unknown eviction '{eviction}' ({', '.join(EVICTIONS)})")
        self.eviction = eviction
        # next-use: the expected next uses, a layer's held experts keyed by them (minus)
        # at each of its visits, as `moecast run`'s cache re-keys them
        self.next_use = None
        if eviction == "next-use":
            import moecast

            self.next_use = moecast.NextUse(len(experts.moe_layers), experts.n_experts)
        # LFU: the log of each expert's decayed uses, undecayed to use 0 (keys compare as
        # the weights do at any moment), and the uses so far
        self.decay = math.log(2) / (LFU_HALF_LIFE * len(experts.moe_layers) * experts.top_k)
        self.use_key, self.tick = {}, 0
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
        self.stray_uses = 0  # uses of an expert not held whose pages were in memory (dropped, read again)
        self.stall_s = 0.0
        # A fault reads only its own page: without both, this kernel's read-around (up to a
        # 2 MB folio per fault, seen on Linux 6.18 / ext4) loads a dozen neighbouring
        # experts with every miss, and no expert-sized residency could be kept.
        for _, n, lo in self.mapping.segments:
            self.libc.madvise(lo, n, _MADV_RANDOM)
            try:  # kernels without transparent huge pages refuse it and need it not
                self.libc.madvise(lo, n, _MADV_NOHUGEPAGE)
            except LlamaCppError:
                pass

        self._io_queue = queue.SimpleQueue()
        self._io_lock = threading.Lock()  # held while a staged read is being queued
        self._io_wanted = set()  # staged reads queued, not issued yet
        self._io_issued = set()  # staged reads issued (this round)
        self.dropped = set()  # dropped with a staged read issued and not landed: its pages may still come
        self._io = threading.Thread(target=self._io_main, name="moecast-staging", daemon=True)
        self._io.start()

    def _io_main(self):
        while (key := self._io_queue.get()) is not None:
            with self._io_lock:
                if key in self._io_wanted:
                    self._io_wanted.discard(key)
                    self._io_issued.add(key)
                    self._read(key)

    def _stage_read(self, key):
        """Queues a staged read on the I/O thread."""
        self._io_wanted.add(key)
        self._io_queue.put(key)

    def close(self):
        self._io_queue.put(None)
        self._io.join()
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
        self.use_key.clear()
        self.staging.clear()
        self.dropped.clear()
        with self._io_lock:
            self._io_issued.clear()
        held = sum(self.is_resident((i, e)) for i in range(len(self.ex.moe_layers)) for e in range(self.ex.n_experts))
        if held:
            raise LlamaCppError(
                f"{self.ex.path}: {held} experts stayed in memory after the file was dropped from the page cache "
                "(a tmpfs such as /dev/shm keeps them, or another process is using the file): put the GGUF on a "
                "disk-backed file system")

    def _drop(self, key):
        """Out of the page cache; a staged read not issued yet never will be, one being
        issued is waited for (so an expert is never dropped before its read is queued),
        and one issued and not landed may still land (the expert is remembered in
        `dropped`)."""
        with self._io_lock:
            self._io_wanted.discard(key)
            issued = key in self._io_issued
        if issued and not self.is_resident(key):
            self.dropped.add(key)
        for off, n in self._ranges(key):
            start = off // _PAGE * _PAGE
            length = off + n - start
            for a in self.mapping.addrs(start, length):
                self.libc.madvise(a, length, _MADV_DONTNEED)
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)

    def _read(self, key):
        for off, n in self._ranges(key):
            os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_WILLNEED)

    def _wait(self, key):
        """Blocks until the expert's pages are in memory (each page touched through the
        mapping: a page still being read is waited for, as llama.cpp's own access would)."""
        for off, n in self._ranges(key):
            start = off // _PAGE * _PAGE
            length = off + n - start
            view = (ctypes.c_ubyte * length).from_address(self.mapping.addrs(start, length)[0])
            np.frombuffer(view, dtype=np.uint8)[::_PAGE].max()

    def _pages(self, key):
        """The expert's pages in memory, and all its pages."""
        have = total = 0
        for off, n in self._ranges(key):
            start = off // _PAGE * _PAGE
            h, t = self.libc.resident_pages(self.mapping.addrs(start, off + n - start)[0], off + n - start)
            have, total = have + h, total + t
        return have, total

    def is_resident(self, key):
        have, total = self._pages(key)
        return have == total

    def _issue(self, keys, count):
        """Reads the experts of `keys` not in memory whole (one request per slice, as an
        offloading runtime loads an expert on a miss, instead of a fault per page);
        returns (which were resident, the missing ones, the ones read on demand: missing
        and not staged, the time the reads were issued, whether any was stray). An expert
        the set does not hold is not resident, whatever the page cache says: a staged read
        dropped while in flight can land after its drop (which does not take pages still
        being read); such a stray is dropped again and read on demand (counted with
        `count`)."""
        stray = [k for k in keys if not self.holds(k) and (k in self.dropped or self._pages(k)[0] > 0)]
        for key in stray:
            self._drop(key)
        self.dropped.difference_update(keys)
        if count:
            self.stray_uses += len(stray)
        resident = [self.holds(k) and self.is_resident(k) for k in keys]
        missing = [k for k, r in zip(keys, resident) if not r]
        t0 = time.perf_counter()  # the request blocks while the device's queue is full
        for key in missing:  # a late staged read's pages are not read twice
            self._read(key)
        return resident, missing, [k for k in missing if not self._awaited(k)], t0, bool(stray)

    def _wait_for(self, missing, t0, meanwhile):
        """Calls `meanwhile()` if any experts are `missing`, then waits for them (read since
        `t0`); returns (the seconds waited after `meanwhile`, the seconds they held the
        layer up, `meanwhile` included, and the reads' seconds: None when they all landed
        during `meanwhile`, which took an unknown part of it)."""
        t1, timed = t0, True
        if missing and meanwhile is not None:
            meanwhile()
            t1 = time.perf_counter()
            timed = not all(self.is_resident(k) for k in missing)
        for key in missing:
            self._wait(key)
        done = time.perf_counter()
        if not missing:
            return 0.0, 0.0, 0.0
        return done - t1, done - t0, done - t0 if timed else None

    def holds(self, key):
        """Whether the set holds `key`: used or staged."""
        return key in self.lru or key in self.staging

    def _awaited(self, key):
        """Whether `key`'s read was issued ahead of its use (staged)."""
        return key in self.staging

    def use(self, i, experts, count=True, observe=True, meanwhile=None):
        """Layer i is about to run `experts`: counts residency (with `count`), reads the
        missing ones, marks them used, calls `meanwhile()` if any are missing (the layers
        ahead forecast while the reads are on the disk) and waits for them; the stall is
        the wait after `meanwhile`. (`observe`: a decode step's routing, not a prompt's;
        see PlannedResidency.)"""
        keys = [(i, int(e)) for e in experts]
        resident_now, missing, _, t0, _ = self._issue(keys, count)
        for key, resident in zip(keys, resident_now):
            self._mark_used(key, resident, count)
        self._routed(i, experts, observe)
        self._evict(set(keys))
        waited, _, _ = self._wait_for(missing, t0, meanwhile)
        if count:
            self.stall_s += waited

    def _take_staged(self, key):
        """Whether `key` was staged and not used yet (it is no longer)."""
        return self.staging.pop(key, None) is not None

    def _mark_used(self, key, resident, count):
        """`key` runs now (most recently used); with `count`, counts how it was found."""
        staged = self._take_staged(key)
        if staged:
            self.staged_used += 1
        self.lru.pop(key, None)
        self.lru[key] = True
        if self.eviction == "lfu":
            self.tick += 1
            t = self.decay * self.tick  # its weight, decayed to this use, plus one
            self.use_key[key] = math.log(math.exp(self.use_key.get(key, -math.inf) - t) + 1) + t
        if count:
            self.uses += 1
            if resident:
                self.resident_uses += 1
            elif staged:  # its read was issued early but has not landed: not read twice
                self.late += 1
            else:
                self.bytes_demand += self._bytes(key)

    def _routed(self, i, experts, observe):
        """Layer i routed to `experts` (next-use): with `observe` (a decode step; a
        prompt's batch is not one visit, as in `moecast run`) the estimate learns it, and
        the layer's held experts are keyed by their expected next use."""
        if self.next_use is None:
            return
        if observe:
            self.next_use.layer_routed(i, np.asarray(experts))
        due = self.next_use.layer(i)
        for key in self.lru:
            if key[0] == i:
                self.use_key[key] = -due[key[1]]

    def stage(self, i, experts):
        """Asks the kernel to read these experts of layer i (not already held)."""
        for e in experts:
            key = (i, int(e))
            if self.holds(key):
                continue
            self._stage_read(key)
            self.staging[key] = True
            self.staged += 1
            self.bytes_staged += self._bytes(key)
            while len(self.staging) > self.slots:
                old, _ = self.staging.popitem(last=False)
                self.bytes_wasted += self._bytes(old)
                self._drop(old)

    def _victim(self, keep):
        """The used expert not in `keep` that `eviction` drops first (None: none)."""
        order = (k for k in self.lru if k not in keep)  # least recent first
        if self.eviction == "lru":
            return next(order, None)
        return min(order, key=self.use_key.__getitem__, default=None)  # min keeps the first of equals

    def _evict(self, keep):
        while len(self.lru) > self.capacity - self.slots:
            key = self._victim(keep)
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
            "stray_uses": self.stray_uses,
            "bytes_demand": self.bytes_demand,
            "bytes_staged": self.bytes_staged,
            "bytes_wasted": self.bytes_wasted,
            "staged_experts": self.staged,
            "staged_used": self.staged_used / max(self.staged, 1),
            "stall_s": self.stall_s,
        }


class PlannedResidency(ExpertResidency):
    """The resident set when moecast's planner (`moecast.Planner`) picks what to stage:
    staged experts share the `capacity` with the used ones, in no slots of their own; a
    staged expert its layer routed without is the first to go, then a used one by
    `eviction` (the planner is told when a staged read evicts one). The planner is told each
    decode step, each layer's routing with its demand reads, and the link's time per
    read, timed on demand reads issued while no staged read is on the link (staged reads
    go through the kernel's readahead, which reports no completion time)."""

    def __init__(self, experts, capacity, planner, top_k, measured=False, eviction="lfu"):
        super().__init__(experts, capacity, 0, eviction)
        self.planner = planner
        self.top_k = top_k
        self.stale = OrderedDict()  # staged, their layer routed without them; oldest first
        self.landed = set()  # staged experts whose read is known to have landed
        self.current = set()  # the layer about to run: never evicted for a staged read
        self.measured = measured  # stated timings, or a read timed

    def drop_all(self):
        self.stale.clear()
        self.landed.clear()
        super().drop_all()

    def _id(self, key):
        return key[0] * self.ex.n_experts + key[1]

    def _in_flight(self):
        """Staged reads not landed yet."""
        n = 0
        for key in self.staging:
            if key in self.landed:
                continue
            if self.is_resident(key):
                self.landed.add(key)
            else:
                n += 1
        return n

    def holds(self, key):
        return super().holds(key) or key in self.stale

    def _awaited(self, key):
        return super()._awaited(key) or key in self.stale

    def _take_staged(self, key):
        self.landed.discard(key)
        return self.staging.pop(key, None) is not None or self.stale.pop(key, None) is not None

    def use(self, i, experts, count=True, observe=True, meanwhile=None):
        keys = [(i, int(e)) for e in experts]
        busy = self._in_flight()
        resident_now, missing, demand, t0, stray = self._issue(keys, count)
        late = any(not r and self._awaited(k) for k, r in zip(keys, resident_now))
        for key, resident in zip(keys, resident_now):
            self._mark_used(key, resident, count)
        self._routed(i, experts, observe)
        for key in [k for k in self.staging if k[0] == i]:  # its layer routed without it
            del self.staging[key]
            self.landed.discard(key)
            self.stale[key] = True
        if observe:
            self.planner.layer_routed(i, np.asarray(experts), len(demand))
        self.current = set(keys)
        self._evict(self.current, told=False)
        staged = self.staged
        waited, held, read_s = self._wait_for(missing, t0, meanwhile)
        if observe:
            # the link held these reads alone: no staged read in flight or issued meanwhile
            if demand and read_s is not None and not busy and not late and not stray and self.staged == staged:
                for _ in demand:
                    self.planner.read_done(read_s / len(demand))
                self.measured = True
            if held > 0:  # the forecast meanwhile included: the rest of a layer is its compute
                self.planner.stalled(held)
        if count:
            self.stall_s += waited

    def offer(self, layer, ranking):
        """Offers MoE layer `layer`'s forecast (best first) for its next lookup to the
        planner and stages what it picks (nothing before a read has been timed)."""
        if not self.measured:
            return
        ranking = np.asarray(ranking)
        ranking = ranking[ranking != 0xFFFF]
        keys = [(layer, int(e)) for e in ranking]
        held = np.array([self.holds(k) for k in keys], dtype=bool)
        pending = len(self.staging)
        free = max(self.capacity - len(self.lru) - pending - len(self.stale), 0)
        room = max(self.capacity - self.top_k - pending, 0)
        for i in self.planner.plan(layer, ranking, None, held, self._in_flight(), free, room):
            key = divmod(int(i), self.ex.n_experts)
            if key in self.lru or key in self.staging:
                continue  # an earlier forecast judged again, resident by now
            if self.stale.pop(key, None) is not None:  # still in memory: staged again, not read
                self.staging[key] = True
                continue
            self._stage_read(key)
            self.staging[key] = True
            self.staged += 1
            self.bytes_staged += self._bytes(key)
            self._evict(self.current | {key}, told=True)

    def _evict(self, keep, told=False):
        while len(self.lru) + len(self.staging) + len(self.stale) > self.capacity:
            if self.stale:
                key, _ = self.stale.popitem(last=False)
                self.bytes_wasted += self._bytes(key)
            elif (key := self._victim(keep)) is not None:
                del self.lru[key]
                if told:
                    self.planner.evicted(self._id(key))
            elif (key := next((k for k in self.staging if k not in keep), None)) is not None:
                del self.staging[key]
                self.landed.discard(key)
                self.bytes_wasted += self._bytes(key)
            else:
                return
            self._drop(key)

    def finish(self):
        self.bytes_wasted += sum(self._bytes(k) for k in self.stale)
        self.stale.clear()
        super().finish()

    def report(self):
        out = super().report()
        out.update({f"planner_{k}": v for k, v in self.planner.report().items() if v is not None})
        return out
