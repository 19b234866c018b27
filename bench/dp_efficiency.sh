#!/usr/bin/env bash
# Data-parallel efficiency on one machine: tokens/s of N ranks x 1 thread (torchrun-style
# processes over loopback TCP) vs 1 rank x N threads, same global batch, alternating runs.
# Usage: bench/dp_efficiency.sh [rounds=3] [ranks=2] [preset=small] [batch=8] [seq=256] [steps=12] [extra train flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} ranks=${2:-2} preset=${3:-small} batch=${4:-8} seq=${5:-256} steps=${6:-12}
shift $(( $# < 6 ? $# : 6 ))
cargo build --release --quiet
bin=./target/release/myriad
out=$(mktemp -d)
common=(train --preset "$preset" --batch "$batch" --seq "$seq" --steps "$steps" --peak-gflops 1 --json "$@")
for r in $(seq "$rounds"); do
  OMP_NUM_THREADS=$ranks "$bin" "${common[@]}" 2>/dev/null > "$out/single.$r.jsonl"
  port=$((29700 + r))
  for rank in $(seq 1 $((ranks - 1))); do
    WORLD_SIZE=$ranks RANK=$rank MASTER_ADDR=127.0.0.1 MASTER_PORT=$port OMP_NUM_THREADS=1 \
      "$bin" "${common[@]}" >/dev/null 2>&1 &
  done
  WORLD_SIZE=$ranks RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port OMP_NUM_THREADS=1 \
    "$bin" "${common[@]}" 2>/dev/null > "$out/dp.$r.jsonl"
  wait
done
python3 - "$out" "$rounds" "$ranks" <<'PY'
import json, statistics, sys
d, rounds, ranks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def run_tps(path):
    rows = [json.loads(l) for l in open(path)][2:]  # skip warm-up steps
    return statistics.median(r["tokens_per_s"] for r in rows)
single = [run_tps(f"{d}/single.{r}.jsonl") for r in range(1, rounds + 1)]
dp = [run_tps(f"{d}/dp.{r}.jsonl") for r in range(1, rounds + 1)]
print("1 rank x %d threads tokens/s per run: %s" % (ranks, ", ".join(f"{x:.0f}" for x in single)))
print("%d ranks x 1 thread tokens/s per run: %s" % (ranks, ", ".join(f"{x:.0f}" for x in dp)))
s, p = statistics.median(single), statistics.median(dp)
print(f"median: single {s:.0f}, data parallel {p:.0f}, efficiency {p / s:.3f}")
PY
