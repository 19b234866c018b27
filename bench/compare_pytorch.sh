#!/usr/bin/env bash
# Side-by-side: Myriad's trainer and PyTorch on the same model and step, alternating runs so both
# see the same machine conditions; prints each run's JSON, then the medians and their ratio.
# Usage: bench/compare_pytorch.sh [rounds=3] [preset=gpt2-124m] [batch=8] [seq=256] [steps=3]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} preset=${2:-gpt2-124m} batch=${3:-8} seq=${4:-256} steps=${5:-3}
python3 -c "import torch" 2>/dev/null || { echo "PyTorch is not installed: pip install torch numpy" >&2; exit 1; }
cargo build --release --quiet
peak=$(./target/release/myriad bench peak --json | python3 -c "import json,sys; print(json.load(sys.stdin)['gflops'])")
echo "measured FP32 FMA peak: $peak GFLOP/s"
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  ./target/release/myriad bench train --preset "$preset" --batch "$batch" --seq "$seq" --steps "$steps" \
    --peak-gflops "$peak" --json 2>/dev/null | tee -a "$out/myriad.jsonl"
  python3 bench/pytorch_gpt2.py --preset "$preset" --batch "$batch" --seq "$seq" --steps "$steps" \
    --peak-gflops "$peak" --json 2>/dev/null | tee -a "$out/pytorch.jsonl"
done
python3 - "$out" <<'PY'
import json, statistics, sys
d = sys.argv[1]
med = {}
for name in ("myriad", "pytorch"):
    rows = [json.loads(l) for l in open(f"{d}/{name}.jsonl")]
    med[name] = statistics.median(r["tokens_per_s"] for r in rows)
    mfu = statistics.median(r["mfu"] for r in rows)
    print(f"{name:8} median {med[name]:8.1f} tokens/s  MFU {100*mfu:5.1f}%  over {len(rows)} runs")
print(f"myriad / pytorch = {med['myriad'] / med['pytorch']:.3f}")
PY
