"""moecast: expert forecasts for Mixture-of-Experts runtimes.

    import moecast
    p = moecast.Predictor("checkpoints/NAME")   # .n_moe_layers .n_experts .top_k .horizon
    s = p.session()
    top = s.predict_next(token)                   # np.uint16 [n_moe_layers, budget]
    ahead = s.predict_lookahead(token, experts_so_far)   # [horizon, budget]
    s.observe(token, experts)                     # experts: ints [n_moe_layers, top_k]
    t = moecast.read_trace("x.mctrace")           # dict of numpy arrays

    b = moecast.Blend("train.mctrace")            # no trained predictor: counts of a
    ids, probs = b.forecast(layer, experts)       # trace or a predictor directory;
    b.observe(token, experts)                     # [horizon, budget] after each layer

    pl = moecast.Planner(n_moe_layers, n_experts, top_k, capacity)
    pl.token_started()                            # each decode step
    stage = pl.plan(layer, ids, probs)            # experts worth a read now, as
    pl.layer_routed(layer, experts, misses)       # layer * n_experts + expert
    pl.read_done(seconds)                         # after each read
    pl.read_issued(seconds)                       # a staged read's issuing, if on the decode thread
    pl.evicted(expert_id)                         # what a staged read evicted

    g = moecast.PrefetchGuard()                   # does prefetch pay here? measured:
    if g.enabled: ...                             # forecast and stage this step
    g.step_done(seconds)                          # each decode step's time

    nu = moecast.NextUse(n_moe_layers, n_experts) # evict by estimated next use:
    nu.layer_routed(layer, experts)               # each decode step's layer, then
    due = nu.layer(layer)                         # float64 [n_experts]; drop the
                                                  # resident expert due latest

`budget` (experts per layer) defaults to top_k. Rows past the last MoE layer are
0xFFFF. Errors raise `moecast.MoecastError` with the library's message.

Threads: every object may be handed to another thread, and forecasts and observations
release the GIL while the predictor runs, so a runtime can forecast on a thread of its
own while its decode thread runs Python. One object is used by one thread at a time
(a second thread's call while one runs raises RuntimeError); a Predictor's sessions are
independent, one per thread if need be.
"""

import numpy as np

from ._moecast import Blend as _Blend
from ._moecast import Guard as _Guard
from ._moecast import MoecastError
from ._moecast import NextUse as _NextUse
from ._moecast import Planner as _Planner
from ._moecast import Predictor as _Predictor
from ._moecast import read_trace_flat as _read_trace_flat

__all__ = ["Blend", "MoecastError", "NextUse", "Planner", "PrefetchGuard", "Predictor", "Session", "read_trace", "NOT_COMPUTED"]

#: Expert id of a layer that was not computed (in traces) / a forecast row past the
#: last layer.
NOT_COMPUTED = 0xFFFF


def _ids(experts, rows, top_k, what):
    a = np.asarray(experts)
    if a.size and (a.min() < 0 or a.max() > 0xFFFF):
        raise MoecastError(f"{what}: expert ids must be in 0..65535")
    a = np.ascontiguousarray(a, dtype=np.uint16).reshape(-1)
    if a.size != rows * top_k:
        raise MoecastError(f"{what}: {a.size} ids, expected {rows} layers x top-{top_k}")
    return a


class Session:
    """One sequence's incremental state (see `Predictor.session`)."""

    def __init__(self, predictor, inner):
        self._p = predictor
        self._s = inner

    def reset(self):
        """Starts a new sequence."""
        self._s.reset()

    def predict_next(self, token, budget=None):
        """Every MoE layer of the token just sampled: uint16 [n_moe_layers, budget]."""
        b = budget or self._p.top_k
        return self._s.predict_next(int(token), b).reshape(self._p.n_moe_layers, b)

    def predict_next_unknown(self, budget=None):
        """Every layer of the next token before its id is sampled (predictors trained
        with --token-dropout): uint16 [n_moe_layers, budget]."""
        b = budget or self._p.top_k
        return self._s.predict_next_unknown(b).reshape(self._p.n_moe_layers, b)

    def predict_lookahead(self, token, experts_so_far, budget=None, router_input=None):
        """The next `horizon` layers after the routed ones (`experts_so_far`:
        [known, top_k]): uint16 [horizon, budget], 0xFFFF past the last layer."""
        b = budget or self._p.top_k
        so_far = np.asarray(experts_so_far)
        known = so_far.shape[0] if so_far.ndim == 2 else so_far.size // self._p.top_k
        ids = _ids(so_far, known, self._p.top_k, "experts_so_far")
        x = None
        if router_input is not None:
            x = np.ascontiguousarray(router_input, dtype=np.float32).reshape(-1)
        out = self._s.predict_lookahead(int(token), known, ids, b, x)
        return out.reshape(self._p.horizon, b)

    def observe(self, token, experts):
        """The token's full routing ([n_moe_layers, top_k]); advances the session."""
        ids = _ids(experts, self._p.n_moe_layers, self._p.top_k, "experts")
        self._s.observe(int(token), ids)


class Predictor:
    """A predictor trained by `moecast train` (its directory)."""

    def __init__(self, path):
        self._p = _Predictor(str(path))
        self.n_moe_layers = self._p.n_moe_layers
        self.n_experts = self._p.n_experts
        self.top_k = self._p.top_k
        self.horizon = self._p.horizon
        self.router_input_dim = self._p.router_input_dim

    def session(self):
        """A new session: one sequence's incremental state."""
        return Session(self, self._p.session())


class Blend:
    """The online blend, for models without a trained predictor: after each routed layer
    it forecasts the next `horizon` layers from co-activation counts (those of `path`: a
    trace, or a predictor directory), the last two tokens' experts and the request's use,
    weighed by a logistic model that learns from every token `observe` is given."""

    def __init__(self, path):
        self._b = _Blend(str(path))
        self.n_moe_layers = self._b.n_moe_layers
        self.n_experts = self._b.n_experts
        self.top_k = self._b.top_k
        self.horizon = self._b.horizon

    def reset(self):
        """A new request: its recent tokens and use are forgotten."""
        self._b.reset()

    def forecast(self, layer, experts, earlier=None, budget=None):
        """Layer `layer` of the current token routed to `experts` (top_k ids; `earlier`:
        its layer `layer - 1`): (uint16 [horizon, budget] ids of the layers after it,
        best first, past the last MoE layer the next token's first layers; float32
        [horizon, budget] probabilities)."""
        b = self.top_k if budget is None else budget
        if layer < 0 or b < 0:
            raise MoecastError(f"layer {layer} and budget {b} must not be negative")
        ids = _ids(experts, 1, self.top_k, "experts")
        prev = None if earlier is None else _ids(earlier, 1, self.top_k, "earlier")
        out, probs = self._b.forecast(int(layer), ids, prev, b)
        return out.reshape(self.horizon, b), probs.reshape(self.horizon, b)

    def observe(self, token, experts):
        """The token's full routing ([n_moe_layers, top_k]); token 0xFFFFFFFF if unknown."""
        if not 0 <= token <= 0xFFFFFFFF:
            raise MoecastError(f"token {token} is outside 0..0xFFFFFFFF")
        self._b.observe(int(token), _ids(experts, self.n_moe_layers, self.top_k, "experts"))


class Planner:
    """Planned prefetch for a runtime that owns its cache and reads: which forecast
    experts are worth a read now, from how sure the forecasts have proved (calibrated
    as the model decodes), the link's time per read and the time between layers. A read
    that cannot arrive before its layer needs it, or that would delay demand reads by
    more than it saves, is not staged. Where a layer computes for less than a read takes
    (the link is bound), it reads only for the next lookup, forecasts above a
    break-even precision (docs/guide.md).

    Tell it each decode step's start (`token_started`), each MoE layer's routing with its
    demand reads (`layer_routed`) and each read's link time (`read_done`); offer it each
    forecast (`plan`). With `read_us` and `layer_us` (microseconds) it plans with those
    timings instead of measuring them."""

    def __init__(self, n_moe_layers, n_experts, top_k, capacity, read_us=None, layer_us=None):
        self._p = _Planner(int(n_moe_layers), int(n_experts), int(top_k), int(capacity),
                           read_us, layer_us)
        self.n_moe_layers, self.n_experts, self.top_k = n_moe_layers, n_experts, top_k

    def token_started(self):
        """A decode step starts (before its first MoE layer routes)."""
        self._p.token_started()

    def layer_routed(self, layer, experts, demand_reads):
        """MoE layer `layer` routed to `experts`, `demand_reads` of them read on demand."""
        self._p.layer_routed(int(layer), _ids(experts, 1, len(np.ravel(experts)), "experts"),
                             int(demand_reads))

    def evicted(self, expert_id):
        """A staged read evicted `expert_id` (layer * n_experts + expert); let staged
        experts their layer routed without be the first to go."""
        if not 0 <= expert_id <= 0xFFFFFFFF:
            raise MoecastError(f"expert id {expert_id} is negative or too large")
        self._p.evicted(int(expert_id))

    def read_done(self, seconds):
        """A read (on demand or staged) took `seconds` of the link."""
        self._p.read_done(float(seconds))

    def read_issued(self, seconds):
        """Issuing a staged read took `seconds` of the decoding thread (where reads take
        the runtime's own CPU): every staged read is charged that much."""
        self._p.read_issued(float(seconds))

    def stalled(self, seconds):
        """A layer's demand reads held the decode thread `seconds` (waiting for them, or
        working meanwhile, as on a forecast): the layer's own compute excludes it."""
        self._p.stalled(float(seconds))

    def plan(self, layer, ranking, probs=None, resident=None, queued_reads=0, free_slots=0,
             room=None):
        """Layer `layer`'s forecast `ranking` (best first; `probs` its probabilities, or
        None to plan with ranks; `resident` True where the expert is resident or being
        read) for its next lookup: uint32 ids `layer * n_experts + expert` to stage now,
        in order (earlier forecasts judged again may come back). `queued_reads`: reads
        on the link now; `free_slots`: free cache slots."""
        ids = _ids(ranking, 1, len(np.ravel(ranking)), "ranking")
        p = None if probs is None else np.ascontiguousarray(probs, dtype=np.float32).reshape(-1)
        r = None if resident is None else np.ascontiguousarray(resident, dtype=bool).reshape(-1)
        if queued_reads < 0 or free_slots < 0 or (room is not None and room < 0):
            raise MoecastError("queued_reads, free_slots and room must not be negative")
        return self._p.plan(int(layer), ids, p, r, int(queued_reads), int(free_slots),
                            None if room is None else int(room))

    def report(self):
        """Offered, staged, late, not_worth counts; read_us, layer_us, the mean
        calibrated probability of the forecasts offered (None before any), and the
        break-even precision where the link is bound (else None)."""
        return dict(self._p.report())


class PrefetchGuard:
    """Whether prefetch pays on this machine, measured: decode steps run in windows of
    `window` with prefetch on or off; one setting is in use (prefetch at first), and now
    and then a window measures the other (after `explore_every` windows at first, less
    often each time the setting in use holds), compared with the windows in use on
    either side of it; the setting follows the mean of the last 8 such comparisons, and
    prefetch stays on unless steps without it are more than 2% faster. It catches
    what the planner's model of the link leaves out: a read's CPU time, the forecasts'
    own cost. The rules of `moecast run`'s prefetch guard (docs/guide.md)."""

    def __init__(self, window=8, explore_every=6):
        if window < 1 or explore_every < 1:
            raise MoecastError("window and explore_every must be at least 1")
        self._g = _Guard(int(window), int(explore_every))

    @property
    def enabled(self):
        """Whether the next decode step prefetches."""
        return self._g.enabled()

    def step_done(self, seconds):
        """A decode step took `seconds`; returns (prefetch on, mean step seconds) when
        it ended a measured window, else None."""
        return self._g.step_done(float(seconds))

    @property
    def steps_off(self):
        """Decode steps run without prefetch so far."""
        return self._g.steps_off()


class NextUse:
    """Next-use eviction for a runtime that owns its expert cache: when each expert is
    expected next, from its layer's gaps between an expert's uses (the mean residual
    life at the expert's idle time) and the expert's own use rate against its layer's
    average (decayed, half-life 64 visits). `moecast run --policy next-use` evicts so.

    Tell it every decode step's routed MoE layer in order (`layer_routed`; a prompt's
    batch is not one visit: key its experts with `layer` as the estimates stand);
    `layer(l)` gives layer l's expected next uses in layer steps since the first routed
    layer (each routed layer is one step): drop the resident expert due latest."""

    def __init__(self, n_moe_layers, n_experts):
        if n_moe_layers < 1 or n_experts < 1:
            raise MoecastError(f"{n_moe_layers} MoE layers x {n_experts} experts: each must be at least 1")
        self._f = _NextUse(int(n_moe_layers), int(n_experts))
        self.n_moe_layers, self.n_experts = n_moe_layers, n_experts

    def layer_routed(self, layer, experts):
        """MoE layer `layer` of a decode step routed to `experts` (indices within the
        layer)."""
        self._f.layer_routed(int(layer), _ids(experts, 1, len(np.ravel(experts)), "experts"))

    def layer(self, layer):
        """Layer `layer`'s experts' expected next uses (float64 [n_experts])."""
        return self._f.layer(int(layer))


def read_trace(path):
    """A moecast trace (.mctrace, .parquet, .jsonl) as a dict of numpy arrays:
    seq [tokens] (index into seq_names), pos, token (0xFFFFFFFF unknown),
    experts [tokens, layers, top_k] (0xFFFF: layer not computed), and when recorded
    weights [tokens, layers, top_k] and each channel the trace carries as
    [tokens, layers, width] float32 under its name (router_inputs, router_logits,
    pre_attention_logits, ...; "channels" maps each name to its width); plus
    n_moe_layers, n_experts, top_k, model, seq_names."""
    d = _read_trace_flat(str(path))
    n, m, k = len(d["seq"]), d["n_moe_layers"], d["top_k"]
    d["experts"] = d["experts"].reshape(n, m, k)
    if "weights" in d:
        d["weights"] = d["weights"].reshape(n, m, k)
    for name, width in d["channels"].items():
        d[name] = d[name].reshape(n, m, width)
    return d
