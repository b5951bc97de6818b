#!/usr/bin/env bash
# How cross-layer forecasts change with depth: a 16-layer tiny MoE (the shipped one has 6),
# trained on the shared corpora, then the demo's collection, two hidden-state predictors
# and `eval` with the model's gates, and the plain-MLP reference of
# tools/hidden_state_ceiling.py when torch and duckdb are installed.
#
#   tools/deeper_model.sh [SHARED] [OUT]     (defaults: ../shared, runs/deep16)
#
# About 31 minutes of training on 2 cores (resumable: rerun after an interruption, or
# with the model already trained it only re-exports it), then about 15 minutes.
# Uses the release build (`cargo build --release`; MOECAST=path/to/moecast skips it).
set -euo pipefail
shopt -s nullglob
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=$(cd "${1:-$ROOT/../shared}" 2>/dev/null && pwd) || { echo "no folder ${1:-$ROOT/../shared}" >&2; exit 1; }
mkdir -p "${2:-$ROOT/runs/deep16}"
OUT=$(cd "${2:-$ROOT/runs/deep16}" && pwd)
cd "$ROOT"
CORPORA=("$SHARED"/corpora/*.txt "$SHARED"/corpora/*.jsonl)
[ ${#CORPORA[@]} -gt 0 ] || { echo "no .txt or .jsonl corpora in $SHARED/corpora" >&2; exit 1; }
if [ -z "${MOECAST:-}" ]; then
  cargo build --release
  MOECAST=${CARGO_TARGET_DIR:-target}/release/moecast
fi
BIN=$MOECAST

"$BIN" tinymoe train --corpus "${CORPORA[@]}" \
  --steps 2000 --layers 16 --aux-loss-coef 0.08 --seed 0 -o "$OUT/model"
"$BIN" collect --model "$OUT/model" --prompts prompts/demo.txt --samples 6 --max-new-tokens 100 \
  --temperature 0.8 --seed 0 --hidden-states -o "$OUT/train.mctrace"
"$BIN" collect --model "$OUT/model" --prompts prompts/heldout.txt --samples 4 --max-new-tokens 100 \
  --temperature 0.8 --seed 1000 --hidden-states -o "$OUT/heldout.mctrace"

# `make demo`'s predictor settings, then wider (the default width, 512) and longer, with
# every known-layer count in each step (the default samples 8 of the 16).
TRAIN=(train --trace "$OUT/train.mctrace" --task lookahead --features hidden --dropout 0.2
  --token-dropout 0.1 --test-fraction 0 --batch-size 4 --warmup-steps 50 --quiet)
"$BIN" "${TRAIN[@]}" --hidden-width 256 --epochs 10 -o "$OUT/predictor-demo"
"$BIN" "${TRAIN[@]}" --epochs 20 --queries-per-batch 16 -o "$OUT/predictor-wide"
for p in demo wide; do
  "$BIN" eval --predictor "$OUT/predictor-$p" --trace "$OUT/heldout.mctrace" --model "$OUT/model" \
    --quiet --json "$OUT/eval-$p.json" > "$OUT/eval-$p.txt"
  echo "== predictor-$p, +1 layer (all horizons: $OUT/eval-$p.txt)"
  grep -A7 '^+1 layer' "$OUT/eval-$p.txt" || true
done

if python3 -c 'import torch, duckdb' 2>/dev/null; then
  "$BIN" trace convert "$OUT/train.mctrace" -o "$OUT/train.parquet"
  "$BIN" trace convert "$OUT/heldout.mctrace" -o "$OUT/heldout.parquet"
  python3 tools/hidden_state_ceiling.py "$OUT/train.parquet" "$OUT/heldout.parquet" | tee "$OUT/ceiling.txt"
else
  echo "note: no torch/duckdb: skipped the MLP reference (tools/hidden_state_ceiling.py)"
fi
