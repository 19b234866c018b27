#!/usr/bin/env bash
# Fuzzes the controller's API against its own OpenAPI document with Schemathesis: a local cluster
# (1 node + 1 spare) with a training job running, every operation called with generated input,
# every response checked for 5xx and for conformance to the document. Left out: POST /v1/chaos,
# which kills ranks and agents on purpose, and POST /v1/agents/register, which would enrol
# imaginary machines whose agents the controller then fails to reach (502, rightly).
# Usage: bench/schemathesis.sh [max-examples=50]   (needs `pip install schemathesis`)
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-50}
st=${SCHEMATHESIS:-schemathesis}
command -v "$st" >/dev/null || { echo "schemathesis not found (pip install schemathesis, or set SCHEMATHESIS)" >&2; exit 1; }
cargo build --release --quiet
bin=$PWD/target/release/myriad
dir=$(mktemp -d)
export MYRIAD_CLUSTER=$dir/.myriad
"$bin" up --nodes 1 --spares 1 --slots 1 --json > "$dir/up.json" 2> "$dir/up.log" &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -s "$dir/up.json" ] && break; sleep 0.1; done
url=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["url"])' "$dir/up.json")
token=$(cat "$MYRIAD_CLUSTER/controller/token")
"$bin" submit --nnodes 1 --nproc-per-node 1 -- "$bin" train --preset tiny --peak-gflops 100 --batch 2 --seq 16 --steps 100000 >/dev/null
"$st" run "$url/openapi.json" --url "$url" -H "Authorization: Bearer $token" \
  --checks all --max-examples "$examples" --seed 1 --no-color --exclude-path /v1/chaos --exclude-path /v1/agents/register
