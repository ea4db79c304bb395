#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head node and a worker node, each its own raylet
# with its own CPUs and a resource naming it, so the cluster path (ray job submit, workers placed
# across nodes, a worker or a node dying) can be tried without a cloud account.
#
#   clusters/local.sh up          # head at 127.0.0.1:6390, dashboard http://127.0.0.1:8275
#   clusters/local.sh up --gcs-ft # the same, with the head's GCS tables kept in Redis (NFR_REDIS, 127.0.0.1:6379)
#   clusters/local.sh status
#   clusters/local.sh kill-head   # every process of the head node, SIGKILL: the head machine lost
#   clusters/local.sh start-head  # the head again, as a supervisor would; with --gcs-ft it finds its state
#   clusters/local.sh down        # stops these two nodes only, not other Ray instances
#
# GCS fault tolerance: with --gcs-ft the head's GCS writes its tables (jobs, actors, placement groups,
# nodes) to Redis under a namespace of this cluster's own, so a head started again on the same
# address takes the cluster back: the worker node's raylet waits for it (up to
# RAY_gcs_rpc_server_reconnect_timeout_s, 60 s) and its actors (Serve replicas, proxies) keep running
# meanwhile. Without it, a lost head takes the cluster with it.
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
# NFR_DASHBOARD_PORT, NFR_HEAD_CPUS, NFR_WORKER_CPUS (2 each by default), NFR_REDIS,
# NFR_WORKER_SERVE_PORT (Serve's proxy on the worker node, 8001; the head's uses the app's port).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${NFR_VENV:-$ROOT/.venv}
STATE=${NFR_CLUSTER_DIR:-/tmp/nfr-local-cluster}
PORT=${NFR_HEAD_PORT:-6390}
DASHBOARD_PORT=${NFR_DASHBOARD_PORT:-8275}
HEAD_CPUS=${NFR_HEAD_CPUS:-2}
REDIS=${NFR_REDIS:-127.0.0.1:6379}
WORKER_SERVE_PORT=${NFR_WORKER_SERVE_PORT:-8001}
WORKER_CPUS=${NFR_WORKER_CPUS:-2}
export RAY_AUTH_MODE=token PATH="$VENV/bin:$PATH"

# Two raylets on one host: every port one node would take by default gets its own value, and
# every node keeps its processes, logs and sockets under its own $STATE/ray-<node> (one log
# monitor per node, so a job's log lines are not read twice), which is how `down` finds them. (Worker
# processes take ports 10002-19999, so the others sit outside that range.)
start_head() {
  if [ -f "$STATE/gcs_ft" ]; then  # the Redis namespace chosen at `up --gcs-ft`
    export RAY_REDIS_ADDRESS=$REDIS RAY_external_storage_namespace=$(cat "$STATE/gcs_ft")
  fi
  start_node head --head --port="$PORT" --num-cpus="$HEAD_CPUS" --resources='{"nfr_head_node": 1}' \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --dashboard-agent-listen-port=52375 \
    --ray-client-server-port=23001 --include-dashboard=true
  unset RAY_REDIS_ADDRESS RAY_external_storage_namespace
}

kill_node() {  # kill_node NAME: SIGKILL every process of that node (its command lines name its temp dir)
  pkill -9 -f -- "--temp-dir=$STATE/ray-$1|$STATE/ray-$1/session" 2>/dev/null || true
  rm -f "$STATE/$1.pid"
}

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
    rm -f "$STATE"/*.pid "$STATE/gcs_ft"
    if [ "${2:-}" = "--gcs-ft" ]; then
      if ! python -c "import socket,sys; h,p='$REDIS'.rsplit(':',1); socket.create_connection((h,int(p)),3)" 2>/dev/null; then
        echo "local.sh: --gcs-ft needs Redis at $REDIS (NFR_REDIS); none answers there" >&2
        exit 1
      fi
      echo "nfr-local-$(date +%s)-$$" >"$STATE/gcs_ft"  # a fresh namespace: no state of an older cluster
    fi
    ray get-auth-token --generate >/dev/null  # token auth: `ray start` needs ~/.ray/auth_token to exist
    start_head
    wait_for_nodes 1
    # Serve's proxy on the worker node listens on a port of its own (the head's takes http_options.port):
    # clients can then go through the worker while the head is down.
    RAY_SERVE_WORKER_PROXY_HTTP_PORT=$WORKER_SERVE_PORT start_node worker --address="127.0.0.1:$PORT" \
      --num-cpus="$WORKER_CPUS" --resources='{"nfr_worker_node": 1}' --dashboard-agent-listen-port=52376
    wait_for_nodes 2
    echo "local.sh: 2 nodes up$([ -f "$STATE/gcs_ft" ] && echo ", GCS in Redis $REDIS"). export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT RAY_AUTH_MODE=token"
    ;;
  kill-head)
    kill_node head
    echo "local.sh: head killed"
    ;;
  start-head)
    # `ray start --head` refuses an address some live Ray process names (the worker's raylet still does) when
    # the temp dir records it as the current cluster: that record is of the head that died.
    rm -f "$STATE/ray-head/ray_current_cluster"
    start_head
    wait_for_nodes 2
    echo "local.sh: head back, 2 nodes alive"
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
    if [ -f "$STATE/gcs_ft" ]; then  # this cluster's tables in Redis go with it
      python -c "from ray._private.gcs_utils import cleanup_redis_storage as c; h, p = '$REDIS'.rsplit(':', 1); \
c(h, int(p), '', False, '$(cat "$STATE/gcs_ft")')" 2>/dev/null || true
      rm -f "$STATE/gcs_ft"
    fi
    echo "local.sh: down"
    ;;
  *)
    echo "usage: $0 up [--gcs-ft]|status|kill-head|start-head|down" >&2
    exit 2
    ;;
esac
