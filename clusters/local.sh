#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head node and a worker node, each its own raylet
# with its own CPUs and a resource naming it, so the cluster path (ray job submit, workers placed
# across nodes, a worker or a node dying) can be tried without a cloud account.
#
#   clusters/local.sh up          # head at 127.0.0.1:6390, dashboard http://127.0.0.1:8275
#   clusters/local.sh status
#   clusters/local.sh down        # stops these two nodes only, not other Ray instances
#
# Jobs, from the repository root:
#
#   export RAY_ADDRESS=http://127.0.0.1:8275 RAY_AUTH_MODE=token   # token: ~/.ray/auth_token
#   .venv/bin/ray job submit --working-dir . -- python jobs/train_moe.py --config jobs/configs/moe_debug.yaml \
#       output_dir=/tmp/nfr-local-cluster/storage/runs data.output_dir=/tmp/nfr-local-cluster/storage/data \
#       train.placement_strategy=STRICT_SPREAD          # one training worker per node
#
# The nodes share this machine's disk, so /tmp/nfr-local-cluster/storage plays the shared storage a
# real cluster mounts at /mnt/cluster_storage. Ray runs from the project's .venv (make venv), so a
# job's `python` has the project installed. Settings: NFR_CLUSTER_DIR, NFR_HEAD_PORT,
# NFR_DASHBOARD_PORT, NFR_HEAD_CPUS, NFR_WORKER_CPUS (2 each by default).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${NFR_VENV:-$ROOT/.venv}
STATE=${NFR_CLUSTER_DIR:-/tmp/nfr-local-cluster}
PORT=${NFR_HEAD_PORT:-6390}
DASHBOARD_PORT=${NFR_DASHBOARD_PORT:-8275}
HEAD_CPUS=${NFR_HEAD_CPUS:-2}
WORKER_CPUS=${NFR_WORKER_CPUS:-2}
export RAY_AUTH_MODE=token PATH="$VENV/bin:$PATH"

# Two raylets on one host: every port one node would take by default gets its own value, and
# every node keeps its processes, logs and sockets under its own $STATE/ray-<node> (one log
# monitor per node, so a job's log lines are not read twice), which is how `down` finds them. (Worker
# processes take ports 10002-19999, so the others sit outside that range.)
start_node() {  # start_node NAME RAY_START_ARGS...
  local name=$1
  shift
  nohup ray start --block --temp-dir="$STATE/ray-$name" "$@" >"$STATE/$name.log" 2>&1 &
  echo $! >"$STATE/$name.pid"
}

wait_for_nodes() {  # wait_for_nodes N
  for _ in $(seq 120); do
    if python - "$1" "$PORT" <<'EOF' 2>/dev/null; then return 0; fi
import sys
import ray
ray.init(address=f"127.0.0.1:{sys.argv[2]}", logging_level="ERROR", log_to_driver=False)
sys.exit(0 if sum(n["Alive"] for n in ray.nodes()) >= int(sys.argv[1]) else 1)
EOF
    sleep 1
  done
  echo "local.sh: the cluster did not reach $1 nodes; logs in $STATE/*.log" >&2
  return 1
}

case "${1:-}" in
  up)
    if [ -f "$STATE/head.pid" ] && grep -q "ray" "/proc/$(cat "$STATE/head.pid")/cmdline" 2>/dev/null; then
      echo "local.sh: already up (head pid $(cat "$STATE/head.pid")); 'down' first" >&2
      exit 1
    fi
    mkdir -p "$STATE/storage"
    rm -f "$STATE"/*.pid
    ray get-auth-token --generate >/dev/null  # token auth: `ray start` needs ~/.ray/auth_token to exist
    start_node head --head --port="$PORT" --num-cpus="$HEAD_CPUS" --resources='{"nfr_head_node": 1}' \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --dashboard-agent-listen-port=52375 \
      --ray-client-server-port=23001 --include-dashboard=true
    wait_for_nodes 1
    start_node worker --address="127.0.0.1:$PORT" --num-cpus="$WORKER_CPUS" --resources='{"nfr_worker_node": 1}' \
      --dashboard-agent-listen-port=52376
    wait_for_nodes 2
    echo "local.sh: 2 nodes up. export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT RAY_AUTH_MODE=token"
    ;;
  status)
    python - "$PORT" <<'EOF'
import sys
import ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
for n in ray.nodes():
    res = {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}
    print(("alive" if n["Alive"] else "dead "), n["NodeID"][:12], res)
EOF
    ;;
  down)
    for name in worker head; do
      pid=$(cat "$STATE/$name.pid" 2>/dev/null || true)
      # `ray start --block` stops its node's processes on SIGTERM (a background job ignores SIGINT).
      if [ -n "$pid" ] && grep -q "ray" "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      fi
      rm -f "$STATE/$name.pid"
    done
    # Whatever outlived that: processes of these two nodes only (their command lines name $STATE/ray-*).
    pkill -9 -f -- "--temp-dir=$STATE/ray-|$STATE/ray-(head|worker)/session" 2>/dev/null || true
    echo "local.sh: down"
    ;;
  *)
    echo "usage: $0 up|status|down" >&2
    exit 2
    ;;
esac
