#!/usr/bin/env bash
# The docker-compose topology without Docker: two coordinators, two order
# participants, one payment, one inventory, as separate processes on this
# machine's servers; then the demo client against them and the invariant
# check. Uses its own databases, vhost and Redis prefix, removed at the end.
# Usage: scripts/run-topology.sh [demo flags...]   (default: --orders 200)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet --bins
bin=target/debug
run=skt_topo_$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
logs=target/topology-logs/$run
mkdir -p "$logs"

rabbitmqctl -q add_vhost "$run" >/dev/null
rabbitmqctl -q set_permissions -p "$run" guest '.*' '.*' '.*' >/dev/null

export DATABASE_URL=postgres://postgres@127.0.0.1:5432/${run}_c
export ORDERS_DATABASE_URL=postgres://postgres@127.0.0.1:5432/${run}_o
export PAYMENTS_DATABASE_URL=postgres://postgres@127.0.0.1:5432/${run}_p
export INVENTORY_DATABASE_URL=postgres://postgres@127.0.0.1:5432/${run}_i
export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/$run
export REDIS_URL=redis://127.0.0.1:6379
export REDIS_KEY_PREFIX=$run:
export RUST_LOG=${RUST_LOG:-warn}
export DB_POOL_SIZE=4

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port1=$(free_port); port2=$(free_port)
# Each participant serves /metrics and /healthz on a port of its own.
mport_o1=$(free_port); mport_o2=$(free_port); mport_p=$(free_port); mport_i=$(free_port)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for db in c o p i; do
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS ${run}_$db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rabbitmqctl -q delete_vhost "$run" >/dev/null 2>&1 || true
  redis-cli --scan --pattern "$run:*" | xargs -r redis-cli del >/dev/null || true
}
trap cleanup EXIT

HTTP_ADDR=127.0.0.1:$port1 "$bin/coordinator" >"$logs/coordinator-1.log" 2>&1 & pids+=($!)
HTTP_ADDR=127.0.0.1:$port2 "$bin/coordinator" >"$logs/coordinator-2.log" 2>&1 & pids+=($!)
HTTP_ADDR=127.0.0.1:$mport_o1 "$bin/participant" order >"$logs/order-1.log" 2>&1 & pids+=($!)
HTTP_ADDR=127.0.0.1:$mport_o2 "$bin/participant" order >"$logs/order-2.log" 2>&1 & pids+=($!)
HTTP_ADDR=127.0.0.1:$mport_p "$bin/participant" payment >"$logs/payment.log" 2>&1 & pids+=($!)
HTTP_ADDR=127.0.0.1:$mport_i "$bin/participant" inventory >"$logs/inventory.log" 2>&1 & pids+=($!)

# wait_ok URL WHAT: polls URL for up to a minute, exits 1 if it never answers.
wait_ok() {
  for _ in $(seq 1 120); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  curl -fsS "$1" >/dev/null || { echo "$2 is not up ($1); logs in $logs" >&2; exit 1; }
}
for port in "$port1" "$port2"; do wait_ok "http://127.0.0.1:$port/readyz" "coordinator on $port"; done
# The participants create their databases at start: wait until all four exist.
for _ in $(seq 1 120); do
  n=$(psql -h 127.0.0.1 -U postgres -tAc "SELECT count(*) FROM pg_database WHERE datname LIKE '${run}\_%'")
  [ "$n" -ge 4 ] && break
  sleep 0.5
done
for port in "$mport_o1" "$mport_o2" "$mport_p" "$mport_i"; do
  wait_ok "http://127.0.0.1:$port/healthz" "participant on $port"
done
echo "topology up: coordinators on :$port1 and :$port2, 2 order, 1 payment, 1 inventory (metrics on :$mport_o1 :$mport_o2 :$mport_p :$mport_i)"

if [ $# -eq 0 ]; then set -- --orders 200; fi
status=0
"$bin/demo" --url "http://127.0.0.1:$port1" "$@" || status=$?

# Every process exposes its metrics.
for url in "127.0.0.1:$port1" "127.0.0.1:$port2"; do
  curl -fsS "http://$url/metrics" | grep '^skald_messages_published_total' >/dev/null \
    || { echo "no skald metrics at $url/metrics" >&2; status=1; }
done
for port in "$mport_o1" "$mport_o2" "$mport_p" "$mport_i"; do
  curl -fsS "http://127.0.0.1:$port/metrics" | grep '^skald_messages_consumed_total' >/dev/null \
    || { echo "no skald metrics at :$port/metrics" >&2; status=1; }
done

# Every process must stop cleanly on SIGTERM.
for pid in "${pids[@]}"; do
  kill -TERM "$pid" 2>/dev/null || { echo "process $pid had exited before the end; logs in $logs" >&2; status=1; }
done
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then echo "process $pid did not exit cleanly; logs in $logs" >&2; status=1; fi
done
pids=()
[ "$status" -eq 0 ] && rm -rf "$logs"
exit "$status"
