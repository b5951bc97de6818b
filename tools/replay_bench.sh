#!/bin/sh
# `make bench`'s engine replay at a production expert size: `make demo`'s held-out trace
# (the shipped model's routing, 6 MoE layers x 16 experts, top-2) replayed through the
# offloading engine on a synthetic checkpoint with Qwen3-30B-A3B's experts (2048 x 768,
# bf16: 9.4 MB each; random weights, the published layout), experts read from disk with
# direct I/O (or, where the file system refuses it, with the page cache dropped).
# Demand paging (LRU, the kept LFU, next-use), the token table and `make demo`'s predictor at a fixed
# budget (top-2) and planned (auto), the predictor also forecasting the next layers after
# each layer (`layers`: it reads the trace's recorded router inputs, as the replay gives
# them), the online blend (started from the predictor's training counts) planned, and
# the oracle (the recorded experts read 1 or 3 layers ahead), at 10% and 25% of the
# experts resident. The modes run interleaved, REPEATS
# rounds, so a drifting disk speed touches them alike; the summary gives each mode's
# mean decode tokens/s, its ratio to next-use demand paging of the same round (paired:
# the disk's speed drifts between rounds by more than most modes differ), with the
# lowest and highest round's ratio, and the share of the gap between the best demand
# paging and the faster oracle it closes.
# `plan-oracle:LEAD` is the oracle's reads offered to the planner as certain forecasts
# (what the planner loses with perfect forecasts).
# Then each mode in ALTERNATE (default: the planned forecasters and the oracles) runs once
# more per round with prefetch alternated on and off every 8 decode steps (`run
# --alternate-prefetch 8`): what prefetch gains measured inside one run, each window
# without it against the windows with it on either side, so the disk's drift between
# runs, which moves separate runs by more than prefetch's effect, cancels; the gap
# closed is then the share of the oracle's in-run gain a forecaster reaches.
# Usage: tools/replay_bench.sh [BIN] [TOKENS] [REPEATS]; MODES="next-use learned:auto ..."
# and ALTERNATE="learned:auto oracle:3 ..." (empty: none) in the environment run only
# those modes (next-use, and an oracle for the gap, should be among them);
# CACHES="25%" runs only those cache sizes (default "10% 25%");
# ARGS="--read-streams 1 ..." adds arguments to every run (an A/B of an engine setting).
# Each run's report goes to runs/bench/replay/runs/ and `moecast compare-runs` charts the
# modes' means per cache size (runs/bench/replay/plots/).
set -e
BIN=${1:-target/release/moecast}
TOKENS=${2:-300}
REPEATS=${3:-2}
DEMO=runs/demo
OUT=runs/bench/replay
if [ ! -f $DEMO/heldout.mctrace ] || [ ! -f $DEMO/predictor/predictor.json ]; then
  echo "the replay bench needs make demo's held-out trace and predictor in $DEMO (run make demo)"
  exit 1
fi
mkdir -p $OUT
if [ ! -f $OUT/ckpt/config.json ]; then
  $BIN checkpoint synth --layers 6 --experts 16 --top-k 2 --vocab 4096 -o $OUT/ckpt
fi
echo "replaying $TOKENS tokens of $DEMO/heldout.mctrace at 9.4 MB per expert (read from disk, no page cache), $REPEATS interleaved rounds"
MODES=${MODES:-lru lfu-kept next-use token:2 token:auto learned:2 learned:auto layers:2 layers:auto blend:auto oracle:1 oracle:3}
ALTERNATE=${ALTERNATE-token:auto learned:auto layers:auto plan-oracle:1 oracle:1 oracle:3}
for mode in $MODES $ALTERNATE; do
  case $mode in
    lru|lfu-kept|next-use|token:*|learned:*|layers:*|blend:*|oracle:*|plan-oracle:*) ;;
    *) echo "MODES: unknown mode '$mode' (lru, lfu-kept, next-use, token:B, learned:B, layers:B, blend:B, oracle:LEAD, plan-oracle:LEAD)"; exit 1 ;;
  esac
done
for mode in $ALTERNATE; do
  case $mode in
    lru|lfu-kept|next-use) echo "ALTERNATE: '$mode' has no prefetch to alternate"; exit 1 ;;
  esac
done
results=$OUT/results.txt
: > $results
rm -rf $OUT/runs && mkdir -p $OUT/runs
# The run arguments of mode $1, in $args.
args_of() {
  case $1 in
    lru|lfu-kept|next-use) args="--policy $1" ;;
    token:*) args="--policy next-use --token-table $DEMO/predictor --prefetch-budget ${1#token:}" ;;
    learned:*) args="--policy next-use --predictor $DEMO/predictor --prefetch-budget ${1#learned:}" ;;
    layers:*) args="--policy next-use --predictor $DEMO/predictor --layer-forecasts --prefetch-budget ${1#layers:}" ;;
    blend:*) args="--policy next-use --blend $DEMO/predictor --prefetch-budget ${1#blend:}" ;;
    oracle:*) args="--policy next-use --oracle-prefetch ${1#oracle:}" ;;
    plan-oracle:*) args="--policy next-use --oracle-prefetch ${1#plan-oracle:} --plan-oracle" ;;
  esac
}
round=1
while [ $round -le $REPEATS ]; do
  for cache in ${CACHES:-10% 25%}; do
    for mode in $MODES; do
      args_of $mode
      line=$($BIN run --model $OUT/ckpt --replay $DEMO/heldout.mctrace --replay-tokens $TOKENS \
        --expert-cache $cache $args ${ARGS:-} --json $OUT/runs/$round-${cache%\%}-$(echo $mode | tr : -).json 2>/dev/null | grep '^decode:')
      printf 'round %s %-4s %-13s %s\n' "$round" "$cache" "$mode" "$line"
      echo "$round $cache $mode $(echo "$line" | awk '{print $2}')" >> $results
    done
    for mode in $ALTERNATE; do
      args_of $mode
      line=$($BIN run --model $OUT/ckpt --replay $DEMO/heldout.mctrace --replay-tokens $TOKENS \
        --expert-cache $cache $args --alternate-prefetch 8 ${ARGS:-} \
        --json $OUT/runs/alternated-$round-${cache%\%}-$(echo $mode | tr : -).json 2>/dev/null | grep '^prefetch measured inside' || echo 'no window pair measured')
      printf 'round %s %-4s %-13s alternated: %s\n' "$round" "$cache" "$mode" "$line"
    done
  done
  round=$((round + 1))
done
echo "mean decode tokens/s over $REPEATS rounds; ratio to next-use demand paging of the same round (mean, and its lowest and highest round: rounds minutes apart see the disk at different speeds, the modes of a round alike); gap closed between the best demand paging and the faster oracle, from the means:"
awk '{ k = $2" "$3; s[k] += $4; n[k]++; tps[$1" "k] = $4; rounds[$1] = 1 } END {
  for (k in s) {
    split(k, p, " "); m[k] = s[k] / n[k]
    if ((p[2] == "lru" || p[2] == "lfu-kept" || p[2] == "next-use") && m[k] > demand[p[1]]) demand[p[1]] = m[k]
    if (p[2] ~ /^oracle/ && m[k] > oracle[p[1]]) oracle[p[1]] = m[k]
  }
  for (k in s) {
    split(k, p, " "); gap = oracle[p[1]] - demand[p[1]]
    closed = (gap > 0 && demand[p[1]] > 0 && p[2] !~ /^oracle/) ? sprintf("%5.0f%%", 100 * (m[k] - demand[p[1]]) / gap) : "     -"
    sum = 0; cnt = 0; lo = ""; hi = ""
    for (r in rounds) {
      b = tps[r" "p[1]" next-use"]
      if ((r" "k) in tps && b > 0) {
        x = tps[r" "k] / b; sum += x; cnt++
        if (lo == "" || x < lo) lo = x
        if (hi == "" || x > hi) hi = x
      }
    }
    ratio = cnt > 0 ? sprintf("%.2fx (%.2f-%.2f)", sum / cnt, lo, hi) : "    - (no next-use)"
    printf "%-4s %-13s %6.2f  %s  %s\n", p[1], p[2], m[k], ratio, closed
  }
}' $results | sort
# The same runs charted (unpaired means per mode, one PNG per cache size), and the
# alternated runs' in-run table and charts.
$BIN compare-runs $OUT/runs/*.json --plot $OUT/plots | awk '/alternated on and off/ { alt = 1 } alt || /plot:/'
