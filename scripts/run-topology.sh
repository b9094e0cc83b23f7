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
"$bin/participant" order >"$logs/order-1.log" 2>&1 & pids+=($!)
"$bin/participant" order >"$logs/order-2.log" 2>&1 & pids+=($!)
"$bin/participant" payment >"$logs/payment.log" 2>&1 & pids+=($!)
"$bin/participant" inventory >"$logs/inventory.log" 2>&1 & pids+=($!)

for port in "$port1" "$port2"; do
  for _ in $(seq 1 120); do
    curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    sleep 0.5
  done
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || { echo "coordinator on $port is not ready; logs in $logs" >&2; exit 1; }
done
# The participants create their databases at start: wait until all four exist.
for _ in $(seq 1 120); do
  n=$(psql -h 127.0.0.1 -U postgres -tAc "SELECT count(*) FROM pg_database WHERE datname LIKE '${run}\_%'")
  [ "$n" -ge 4 ] && break
  sleep 0.5
done
echo "topology up: coordinators on :$port1 and :$port2, 2 order, 1 payment, 1 inventory"

if [ $# -eq 0 ]; then set -- --orders 200; fi
status=0
"$bin/demo" --url "http://127.0.0.1:$port1" "$@" || status=$?

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
