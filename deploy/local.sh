#!/usr/bin/env bash
# A real multi-process fewstep on one machine: redis-server (AOF on), one gateway, N engine workers.
#
#   deploy/local.sh                 # gateway on 127.0.0.1:8000, 2 workers, Redis on 6390
#   WORKERS=3 PORT=9000 deploy/local.sh
#
# Worker i serves its /metrics on METRICS_PORT + i - 1 (default 9100, 9101, ...), the gateway on its
# own port: deploy/prometheus/prometheus.yml scrapes those.
#
# Everything runs in the foreground; Ctrl-C (or SIGTERM) stops all of it. Logs and Redis data
# go to var/local/. Workers get FEWSTEP_THREADS=1 each so that they do not oversubscribe the cores.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
REDIS_PORT=${REDIS_PORT:-6390}
WORKERS=${WORKERS:-2}
METRICS_PORT=${METRICS_PORT:-9100}
STATE=${STATE:-var/local}

[ -x "$BIN/fewstep" ] || { echo "run 'make install' first"; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server missing: apt-get install redis-server"; exit 1; }
mkdir -p "$STATE/redis"

pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping ${#pids[@]} processes"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}
trap 'stop; exit 0' INT TERM  # asked to stop: a clean stop is a success
trap stop EXIT                # a process died on its own: stop the rest, keep the failure status

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE/redis" --appendonly yes --save '' \
  >"$STATE/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

export FEWSTEP_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
FEWSTEP_HOST=$HOST FEWSTEP_PORT=$PORT "$BIN/fewstep" serve >"$STATE/gateway.log" 2>&1 &
pids+=($!)
for i in $(seq "$WORKERS"); do
  FEWSTEP_THREADS=1 "$BIN/fewstep" worker --name "local-$i" --metrics-port $((METRICS_PORT + i - 1)) \
    >"$STATE/worker-$i.log" 2>&1 &
  pids+=($!)
done

echo "gateway http://$HOST:$PORT  redis :$REDIS_PORT  workers $WORKERS  logs $STATE/"
for _ in $(seq 600); do
  curl -fsS "http://$HOST:$PORT/readyz" >/dev/null 2>&1 && { echo "ready"; break; }
  sleep 0.2
done
wait -n "${pids[@]}" || true
echo "a process exited; see $STATE/*.log"
exit 1
