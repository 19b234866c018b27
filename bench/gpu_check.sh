#!/usr/bin/env bash
# The GPU check for a machine with NVIDIA GPUs (and their driver), in under 5 minutes: a local
# cluster of one node whose agent finds its GPUs through NVML, what it discovered, one rank per GPU
# printing its binding, the agent's GPU metrics and its health findings.
#
#   bench/gpu_check.sh            # uses target/release/myriad, building it if it is missing
#   MYRIAD=/path/to/myriad bench/gpu_check.sh
#   FAKE_GPUS=dir bench/gpu_check.sh   # a dry run where there is no GPU: dir/node-0.json describes
#                                      # the node's GPUs (the agent's fake backend)
#
# Prints a short report last; with $OUT set (a results folder), keeps the logs there too.
set -euo pipefail
cd "$(dirname "$0")/.."
myriad=${MYRIAD:-target/release/myriad}
if [[ ! -x $myriad ]]; then
  echo "== building $myriad"
  cargo build --release -p myriad
fi
work=$(mktemp -d /tmp/myriad-gpu-check.XXXXXX)
out=${OUT:-$work}
export MYRIAD_CLUSTER=$work/.myriad
cleanup() {
  [[ -n ${up_pid:-} ]] && kill "$up_pid" 2>/dev/null && wait "$up_pid" 2>/dev/null
  cp -r "$MYRIAD_CLUSTER/logs" "$out/logs" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== nvidia-smi"
nvidia-smi --query-gpu=index,uuid,name,memory.total,driver_version --format=csv,noheader || echo "(no nvidia-smi)"

echo "== myriad up: one node, its slots discovered from its GPUs"
# No --slots: the agent takes one slot per GPU NVML reports.
fake=()
[[ -n ${FAKE_GPUS:-} ]] && fake=(--fake-gpus "$FAKE_GPUS")
"$myriad" up --nodes 1 --cluster "$MYRIAD_CLUSTER" "${fake[@]}" --json > "$work/up.json" &
up_pid=$!
for _ in $(seq 1 300); do
  [[ -s $work/up.json ]] && break
  sleep 0.1
done
[[ -s $work/up.json ]] || { echo "the cluster did not come up"; exit 1; }
sleep 1
"$myriad" nodes --json > "$out/nodes.json"
python3 - "$out/nodes.json" <<'EOF'
import json, sys
for n in json.load(open(sys.argv[1])):
    print("node %s: %d slots, health %s" % (n["name"], n["slots"], n["health"]))
    for g in n["gpus"]:
        print("  GPU %d: %s, %d MiB, %s, bus %s" % (g["index"], g["model"], g["memory_mib"], g["uuid"], g["bus_id"]))
    for f in n["gpu_findings"]:
        print("  finding on GPU %d: %s%s" % (f["index"], "FATAL " if f["fatal"] else "", f["reason"]))
EOF
gpus=$(python3 -c 'import json; print(len(json.load(open("'"$out"'/nodes.json"))[0]["gpus"]))')
[[ $gpus -gt 0 ]] || { echo "the agent found no GPU (see $out/logs/node-0.log)"; exit 1; }

echo "== one rank per GPU, each printing its binding"
id=$("$myriad" submit --json --nnodes 1 --nproc-per-node "$gpus" -- sh -c \
  'echo "rank $RANK local $LOCAL_RANK: GPU $MYRIAD_GPU_INDEX $MYRIAD_GPU_UUID CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES CUDA_DEVICE_ORDER=$CUDA_DEVICE_ORDER TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING"; nvidia-smi -L 2>/dev/null | head -1' |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 1 300); do
  state=$("$myriad" status "$id" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["job"]["state"])')
  [[ $state == succeeded || $state == failed ]] && break
  sleep 0.1
done
echo "job $id: $state"
for ((r = 0; r < gpus; r++)); do
  "$myriad" logs "$id" --rank "$r" | tee -a "$out/bindings.txt"
done

echo "== the agent's GPU metrics"
python3 - "$MYRIAD_CLUSTER" <<'EOF' | tee "$out/gpu_metrics.txt"
import json, sys, urllib.request
cluster = sys.argv[1]
url = open(f"{cluster}/controller/controller.url").read().strip()
token = open(f"{cluster}/controller/token").read().strip()
def get(base, path):
    req = urllib.request.Request(base + path, headers={"Authorization": "Bearer " + token})
    return urllib.request.urlopen(req, timeout=5).read().decode()
node = json.loads(get(url, "/v1/nodes"))[0]
for line in get(f"http://{node['addr']}:{node['http_port']}", "/metrics").splitlines():
    if line.startswith("myriad_agent_gpu_"):
        print(line)
EOF
echo "== done: $gpus GPUs found, job $state"
