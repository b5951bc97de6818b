"""What a staged read and a demand read add to a decode step on this machine.

    python3 llamacpp/step_costs.py STEPS.csv [--json OUT.json]

STEPS.csv is `moecast_prefetch -s`'s log, one row per timed decode step. For each mode
it fits the step's time by least squares on the step's staged reads, its demand reads,
whether it forecast (where both kinds of step occur) and one intercept per round (the
machine's speed drifts between rounds), and prints each cost with its standard error.
A staged read that is used replaces a demand read, so staging pays only for forecasts
more likely than (staged read's cost) / (demand read's cost) to be used: the
break-even precision printed. Where reads take the machine's CPU (a page cache on a
small VM), a staged read costs nearly what a demand read does and that precision nears 1.
"""

import argparse
import csv
import json
import math
import os
import sys

import numpy as np

COLUMNS = ["mode", "round", "forecast", "seconds", "staged_reads", "demand_reads", "stall_s", "issue_s"]


class StepLogError(Exception):
    pass


def parse_row(row):
    """(round, forecast, ms, staged, demand) of one row; ValueError naming the column."""
    if len(row) != len(COLUMNS):
        raise ValueError(f"{len(row)} fields, expected {len(COLUMNS)}")
    values = []
    for col, kind in ((1, int), (2, int), (3, float), (4, int), (5, int)):
        try:
            values.append(kind(row[col]))
        except ValueError:
            raise ValueError(f"{COLUMNS[col]} is {row[col]!r}, not a number") from None
    if values[1] not in (0, 1):
        raise ValueError(f"forecast is {values[1]}, not 0 or 1")
    if not all(math.isfinite(v) and v >= 0 for v in values[2:]):
        raise ValueError("a negative or non-finite time or count")
    values[2] *= 1e3
    return tuple(values)


def read_steps(path):
    """The log's rows by mode, in file order: (round, forecast, ms, staged, demand)."""
    modes = {}
    read = 0  # lines read whole
    try:
        with open(path, newline="") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header != COLUMNS:
                raise StepLogError(f"{path}: line 1 is not moecast_prefetch -s's header ({','.join(COLUMNS)})")
            read = 1
            for row in rows:
                modes.setdefault(row[0] if row else "", []).append(parse_row(row))
                read = rows.line_num
    except OSError as e:
        raise StepLogError(f"{path}: cannot read: {e.strerror}") from e
    except (csv.Error, UnicodeDecodeError, ValueError) as e:
        raise StepLogError(f"{path}: line {read + 1}: {e}") from e
    if not modes:
        raise StepLogError(f"{path}: no steps")
    return modes


def fit(a):
    """Least squares of a step's milliseconds over the steps `a` (rows of read_steps):
    {name: (cost, standard error)} for the regressors that vary (staged reads, demand
    reads, forecasting), or None when they cannot be told apart."""
    rounds, forecast, ms, staged, demand = a.T
    columns, names = [], []
    for r in np.unique(rounds):
        columns.append((rounds == r).astype(float))
        names.append(None)
    for name, x in (("forecast", forecast), ("staged", staged), ("demand", demand)):
        if np.ptp(x) > 0:
            columns.append(x)
            names.append(name)
    X = np.column_stack(columns)
    beta, _, rank, _ = np.linalg.lstsq(X, ms, rcond=None)
    dof = len(ms) - X.shape[1]
    if rank < X.shape[1] or dof < 1:
        return None
    resid = ms - X @ beta
    cov = np.linalg.inv(X.T @ X) * (resid @ resid) / dof
    se = np.sqrt(np.diag(cov))
    return {n: (beta[i], se[i]) for i, n in enumerate(names) if n}


def report(path):
    out = {}
    for mode, steps in read_steps(path).items():
        a = np.array(steps, dtype=float)
        costs, n = fit(a), len(a)
        line = f"{mode:<10} {n:5d} steps, {a[:, 3].mean():.2f} staged and {a[:, 4].mean():.2f} demand reads a step"
        if costs is None:
            print(line + "; too few steps (or too little variation) to fit")
            out[mode] = {"steps": n}
            continue
        for name, what in (("staged", "a staged read"), ("demand", "a demand read"), ("forecast", "forecasting")):
            if name in costs:
                c, s = costs[name]
                line += f"; {what} {c:.2f} ms (+-{s:.2f})"
        entry = {"steps": n, **{k: {"ms": c, "se_ms": s} for k, (c, s) in costs.items()}}
        if "staged" in costs and "demand" in costs and costs["demand"][0] > 0:
            entry["break_even_precision"] = costs["staged"][0] / costs["demand"][0]
            line += f"; break-even precision {entry['break_even_precision']:.2f}"
        print(line)
        out[mode] = entry
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("steps", help="moecast_prefetch -s's CSV")
    ap.add_argument("--json", help="also write the fits here")
    args = ap.parse_args()
    try:
        out = report(args.steps)
    except StepLogError as e:
        sys.exit(f"error: {e}")
    if args.json:
        try:
            with open(args.json + ".partial", "w") as f:
                json.dump(out, f, indent=2)
            os.replace(args.json + ".partial", args.json)
        except OSError as e:
            sys.exit(f"error: {args.json}: cannot write: {e.strerror}")


if __name__ == "__main__":
    main()
