#!/usr/bin/env bash
# Does more, and more varied, training data close the gap to 0.95 on the demo model?
# Traces the shipped tiny MoE over passages of the shared corpora (prefill only,
# `collect --max-new-tokens 0`: 3,364 passages, about 434 k tokens), adds `make
# demo-hidden`'s 12-sample collection, trains the hidden-state predictor with `make
# demo-hidden`'s settings (2 epochs instead of 12: the trace is 12 times longer) and
# evaluates it on the demo's held-out trace with the model's gates; then, when torch is
# installed, the plain per-layer MLP of tools/hidden_state_ceiling.py with the same fixed
# step budget on the 12-sample trace alone and on both.
#
#   tools/corpus_predictor.sh [SHARED] [OUT]     (defaults: ../shared, runs/corpus)
#
# About 6 minutes of collection, 30-45 of training (see the README on long runs), then
# about 20 for the MLPs (1 thread each, as the README's figures were made).
# Every step is resumable or cheap to redo: rerun after an interruption.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=$(cd "${1:-$ROOT/../shared}" 2>/dev/null && pwd) || { echo "no folder ${1:-$ROOT/../shared}" >&2; exit 1; }
mkdir -p "${2:-$ROOT/runs/corpus}"
OUT=$(cd "${2:-$ROOT/runs/corpus}" && pwd)
cd "$ROOT"
[ -d "$SHARED/corpora" ] || { echo "no corpora in $SHARED/corpora" >&2; exit 1; }
if [ -z "${MOECAST:-}" ]; then
  cargo build
  MOECAST=${CARGO_TARGET_DIR:-target}/debug/moecast
fi
BIN=$MOECAST
MODEL=checkpoints/tiny-moe

# Up to 400 passages of at least 16 words per corpus file, each cut to 600 characters,
# chosen and shuffled with seed 0. Text files are split into lines; a file with fewer
# than 400 long lines (code, verse) into 600-character windows instead.
python3 - "$SHARED/corpora" "$OUT/passages.jsonl" <<'EOF'
import glob, json, random, sys
random.seed(0)
passages = []
for path in sorted(glob.glob(sys.argv[1] + "/*")):
    if path.endswith(".jsonl"):
        rows = [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]
        texts = [r.get("question") or r.get("prompt") or r.get("text") or "" for r in rows]
    elif path.endswith(".txt"):
        raw = open(path, encoding="utf-8").read()
        texts = [l for l in raw.split("\n") if len(l.split()) > 20]
        if len(texts) < 400:
            texts = [raw[i : i + 600] for i in range(0, len(raw) - 600, 600)]
    else:
        continue
    texts = [t[:600] for t in texts if len(t.split()) > 15]
    random.shuffle(texts)
    passages += texts[:400]
random.shuffle(passages)
with open(sys.argv[2], "w", encoding="utf-8") as out:
    for t in passages:
        out.write(json.dumps({"text": t}) + "\n")
print(f"{len(passages)} passages -> {sys.argv[2]}")
EOF

collect() { [ -f "$1" ] || "$BIN" collect --model $MODEL --hidden-states -o "$@"; }
collect "$OUT/corpus.mctrace" --prompts "$OUT/passages.jsonl" --max-new-tokens 0
collect "$OUT/demo12.mctrace" --prompts prompts/demo.txt --samples 12 --max-new-tokens 100 \
  --temperature 0.8 --seed 0
collect "$OUT/heldout.mctrace" --prompts prompts/heldout.txt --samples 4 --max-new-tokens 100 \
  --temperature 0.8 --seed 1000

"$BIN" train --trace "$OUT/corpus.mctrace" "$OUT/demo12.mctrace" --task lookahead --features hidden \
  --dropout 0.2 --token-dropout 0.1 --test-fraction 0 --epochs 2 --batch-size 4 --warmup-steps 50 \
  --quiet -o "$OUT/predictor"
"$BIN" eval --predictor "$OUT/predictor" --trace "$OUT/heldout.mctrace" --model $MODEL --quiet \
  --json "$OUT/eval.json" > "$OUT/eval.txt"
echo "== corpus + 12 samples per prompt, +1 layer (all horizons: $OUT/eval.txt)"
grep -A7 '^+1 layer' "$OUT/eval.txt" || true

if python3 -c 'import torch' 2>/dev/null; then
  for train in demo12 "corpus demo12"; do
    files=()
    for t in $train; do files+=("$OUT/$t.mctrace"); done
    result="$OUT/ceiling-${train// /+}.txt"
    if [ ! -f "$result" ]; then
      OMP_NUM_THREADS=1 python3 tools/hidden_state_ceiling.py "${files[@]}" "$OUT/heldout.mctrace" --steps 20000 \
        > "$result.partial"
      mv "$result.partial" "$result"
    fi
    echo "== per-layer MLP, 20000 steps, trained on: $train"
    cat "$result"
  done
else
  echo "note: no torch: skipped the MLP reference (tools/hidden_state_ceiling.py)"
fi
