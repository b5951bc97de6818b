"""`moecast_llamacpp.py prefetch`: decodes with a bounded set of resident experts, on
demand and with each prefetch mode of `--budget`, alternating `--rounds` times (every
second round in reverse order, as in the C harness, so a steady drift in the machine's
speed cancels over an even number of rounds instead of favouring the modes that run
first), and prints (and with `--json` writes) the table, each mode's lowest and highest
round over on demand's beside the ratio of the means. See residency_decode.py."""

import json
import os
import sys

import numpy as np

from residency_decode import decode_with_residency
from moecast_llamacpp import LlamaCppError, LlamaCppModel, read_prompts


def _capacity(text, total):
    try:
        if text.endswith("%"):
            frac = float(text[:-1]) / 100
            if not 0 < frac <= 1:
                raise ValueError
            return max(1, round(frac * total))
        n = int(text)
        if n < 1:
            raise ValueError
        return n
    except ValueError:
        raise LlamaCppError(f"--resident {text!r}: give a count of experts or a percentage in (0, 100]") from None


def _threads(text):
    """`--threads N[,M]`: llama.cpp's threads, and in the decode steps that forecast (M <=
    N; default 1). llama.cpp's threads wait for each other at every operation, so the
    staged reads' work taking one's core stalls them all; this harness forecasts on the
    decode thread itself, so M < N leaves a core only to its I/O thread (measured:
    docs/results.md#llamacpp)."""
    if text is None:
        return (1, 1)
    try:
        n = [int(x) for x in text.split(",")]
        if len(n) == 1:
            n *= 2
        if len(n) != 2 or n[1] < 1 or n[1] > n[0]:
            raise ValueError
        return tuple(n)
    except ValueError:
        raise LlamaCppError(f"--threads {text!r}: give N or N,M (threads while forecasting), at least 1, M "
                            "not above N") from None


def _budgets(text):
    """`--budget`: comma-separated, each `auto` (the planner) or experts per forecast layer."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "auto":
            out.append(part)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            raise LlamaCppError(f"--budget: '{part}' is neither auto nor a number of experts of at least 1")
    if len(set(out)) != len(out):
        raise LlamaCppError(f"--budget {text} names a budget twice")
    return out


def cmd_prefetch(args):
    predictor = None
    if args.predictor:
        import moecast

        try:
            predictor = moecast.Predictor(args.predictor)
        except moecast.MoecastError as e:
            raise LlamaCppError(str(e)) from None
    threads = _threads(args.threads)
    # replayed, a predictor that reads router inputs gets the trace's (see below)
    model = LlamaCppModel(args.model, n_ctx=args.ctx, threads=threads[0],
                          router_inputs=bool(predictor and predictor.router_input_dim and not args.replay))
    ex = model.experts
    total = len(ex.moe_layers) * ex.n_experts
    capacity = _capacity(args.resident, total)
    prompts, replay = None, None
    if args.replay:
        import moecast

        try:
            replay = moecast.read_trace(args.replay)
        except moecast.MoecastError as e:  # its message names the file
            raise LlamaCppError(str(e)) from None
    elif args.prompts:
        prompts = read_prompts(args.prompts, model, args.add_special_tokens)
    else:
        raise LlamaCppError("prefetch needs --prompts or --replay")
    if predictor is not None:
        if (predictor.n_moe_layers, predictor.n_experts, predictor.top_k) != (len(ex.moe_layers), ex.n_experts,
                                                                              ex.top_k):
            raise LlamaCppError(
                f"{args.predictor}: predictor shape {predictor.n_moe_layers} layers x {predictor.n_experts} "
                f"experts, top-{predictor.top_k}, does not match {args.model} ({len(ex.moe_layers)} x "
                f"{ex.n_experts}, top-{ex.top_k})"
            )
    for flag, value in (("--rounds", args.rounds), ("--horizon", args.horizon)):
        if value < 1:
            raise LlamaCppError(f"{flag} must be at least 1")
    budgets = _budgets(args.budget)
    if (args.read_us is None) != (args.layer_us is None):
        raise LlamaCppError("--read-us and --layer-us go together (or neither: the planner measures them)")
    timings = None
    if args.read_us is not None:
        if not (args.read_us > 0 and args.layer_us > 0):
            raise LlamaCppError("--read-us and --layer-us must be above 0")
        timings = (args.read_us, args.layer_us)
    if args.max_new_tokens < 1 and replay is None:
        raise LlamaCppError("--max-new-tokens must be at least 1")
    if predictor is not None and predictor.router_input_dim:
        if replay is None:
            if predictor.router_input_dim != model.n_embd:
                raise LlamaCppError(f"{args.predictor}: reads router inputs of width {predictor.router_input_dim}, "
                                    f"{args.model}'s are {model.n_embd}")
        elif (recorded := replay["channels"].get("router_inputs", 0)) != predictor.router_input_dim:
            raise LlamaCppError(f"{args.predictor} reads router inputs {predictor.router_input_dim} wide; replayed, "
                                f"they come from {args.replay}, which records "
                                + (f"them {recorded} wide" if recorded else "none"))
    modes = [("on-demand", None, None)]
    if predictor:
        modes += [("planned" if b == "auto" else f"budget-{b}", predictor, b) for b in budgets]
    runs = {name: [] for name, _, _ in modes}
    guard = None  # planned prefetch's, kept over the rounds as a runtime keeps it over requests
    if "auto" in budgets and not args.no_guard:
        import moecast

        guard = moecast.PrefetchGuard()
    for r in range(args.rounds):
        for name, p, budget in modes[::-1] if r % 2 else modes:
            out = decode_with_residency(model, prompts, capacity, args.max_new_tokens, p, budget,
                                        args.temperature, args.seed, replay, args.replay_tokens, args.horizon,
                                        timings, guard if budget == "auto" else False, threads, args.eviction)
            runs[name].append(out)
            print(f"round {r + 1}/{args.rounds} {name}: {out['tokens_per_s']:.1f} tokens/s, "
                  f"{100 * out['resident_when_used']:.1f}% resident when used", file=sys.stderr, flush=True)
    summary = {}
    for name, outs in runs.items():
        # a figure some rounds lack (the planner's break-even precision, where its link
        # measured bound in some rounds only) is the mean of those that have it
        keys = dict.fromkeys(k for o in outs for k in o)
        s = {k: float(np.mean([o[k] for o in outs if k in o])) for k in keys}
        s["tokens_per_s_rounds"] = [o["tokens_per_s"] for o in outs]
        summary[name] = s
    base = summary["on-demand"]
    for s in summary.values():
        s["vs_on_demand_rounds"] = [t / b if b > 0 else 0.0
                                    for t, b in zip(s["tokens_per_s_rounds"], base["tokens_per_s_rounds"])]
    mb = lambda x: x / 1e6
    print(f"{args.model}: {capacity} of {total} experts resident ({args.resident}), "
          f"{ex.expert_bytes[0]:,} bytes per expert, llama.cpp threads {threads[0]} ({threads[1]} while forecasting), "
          f"{args.eviction} eviction, {args.rounds} round(s), "
          + (f"routing replayed from {args.replay}" if replay is not None else
             f"{'greedy' if args.temperature <= 0 else f'temperature {args.temperature} seed {args.seed}'}, "
             f"up to {args.max_new_tokens} new tokens per prompt")
          + (f", router inputs ({predictor.router_input_dim} wide) from "
             + ("the trace" if replay is not None else "llama.cpp's ffn_norm")
             if predictor is not None and predictor.router_input_dim else ""))
    print(f"{'mode':<10} {'resident when used':>18} {'demand MB':>10} {'staged MB':>10} {'wasted MB':>10} "
          f"{'staged used':>11} {'stall s':>8} {'tokens/s':>9} {'vs on-demand':>12} {'rounds min-max':>15}")
    for name, s in summary.items():
        ratios = s["vs_on_demand_rounds"]
        print(f"{name:<10} {100 * s['resident_when_used']:>17.1f}% {mb(s['bytes_demand']):>10.2f} "
              f"{mb(s['bytes_staged']):>10.2f} {mb(s['bytes_wasted']):>10.2f} "
              f"{100 * s['staged_used']:>10.1f}% {s['stall_s']:>8.2f} {s['tokens_per_s']:>9.1f} "
              f"{s['tokens_per_s'] / base['tokens_per_s'] if base['tokens_per_s'] > 0 else 0.0:>11.2f}x "
              f"{min(ratios):>9.2f}-{max(ratios):.2f}x")
    if "planned" in summary:
        s = summary["planned"]
        print(f"planned: {s['planner_staged']:.0f} of {s['planner_offered']:.0f} forecast experts offered were "
              f"worth a read ({s['planner_late']:.0f} too late, {s['planner_not_worth']:.0f} not worth it), "
              f"with reads measured at {s['planner_read_us'] / 1e3:.2f} ms and layers at "
              f"{s['planner_layer_us'] / 1e3:.2f} ms (means over rounds)"
              + ("" if "steps_without_prefetch" not in s else f"; prefetch guard: {s['steps_without_prefetch']:.0f} of "
                 f"{s['decode_steps']:.0f} decode steps without prefetch (measured not to pay, or measuring that)"))
    if threads[1] < threads[0]:
        print(f"steps with {threads[1]} llama.cpp thread(s) (forecasting), of all: " + ", ".join(
            f"{name} {s['steps_fewer_threads']:.0f} of {s['decode_steps']:.0f}" for name, s in summary.items())
              + " (means over rounds)")
    if args.json:
        out = {"model": args.model, "resident": args.resident, "capacity": capacity, "experts": total,
               "expert_bytes": ex.expert_bytes[0], "max_new_tokens": args.max_new_tokens,
               "rounds": args.rounds, "replay": args.replay, "replay_tokens": args.replay_tokens, "temperature": args.temperature, "seed": args.seed, "predictor": args.predictor,
               "threads": list(threads), "eviction": args.eviction, "budget": args.budget, "horizon": args.horizon, "guard": not args.no_guard, "read_us": args.read_us, "layer_us": args.layer_us,
               "modes": summary}
        tmp = args.json + ".partial"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json)
    model.close()
