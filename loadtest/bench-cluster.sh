#!/usr/bin/env bash
# Measure the four services as separate processes on the real backends (Redis,
# Kafka, Cassandra from deploy/local/up.sh) with the load harness's chat-1to1 mode,
# then report where the time goes per hop from each service's /metrics.
#
#   nice cargo build --release -p switchboard -p switchboard-load
#   deploy/local/up.sh
#   loadtest/bench-cluster.sh                 # reports land in $OUT
#   SCENARIO="loadtest/scenarios/smoke.toml loadtest/scenarios/groups.toml" \
#       DURATION=20s loadtest/bench-cluster.sh
#
# Environment: SB and LOAD (binaries), OUT (report directory), RATES, CLIENTS,
# DURATION, WARMUP, PARTITIONS. A fresh key prefix, topic, consumer group and keyspace
# per run. SCENARIO (one or more scenario files) replaces the chat-1to1 runs with
# `switchboard-load run` of each file, its report (report.md, report.json, SVG
# plots) in $OUT/<scenario name>/; DURATION and WARMUP replace the scenario's only
# when set. Everything targets 127.0.0.1 and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

SCENARIO=${SCENARIO:-}
# Only given values replace a scenario's own phases.
SCENARIO_PHASES=()
[ -n "${DURATION:-}" ] && SCENARIO_PHASES+=(--duration "$DURATION")
[ -n "${WARMUP:-}" ] && SCENARIO_PHASES+=(--warmup "$WARMUP")
SB=${SB:-target/release/switchboard}
LOAD=${LOAD:-target/release/switchboard-load}
OUT=${OUT:-$(mktemp -d /tmp/switchboard-bench-cluster.XXXXXX)}
RATES=${RATES-"250 500 1000"}
CLIENTS=${CLIENTS:-1000}
DURATION=${DURATION:-30s}
WARMUP=${WARMUP:-5s}
PARTITIONS=${PARTITIONS:-16}
mkdir -p "$OUT"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n')
export SWITCHBOARD_LOAD_SECRET=$SECRET
# The internal gRPC calls' shared credential (the services refuse to start without one).
CLUSTER_CREDENTIAL=$(head -c 48 /dev/urandom | base64 | tr -d '\n')
PIDS=()
DATA=

stop_all() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
    [ -n "$DATA" ] && rm -rf "$DATA"
    DATA=
}
trap stop_all EXIT

wait_ready() { # port name
    for _ in $(seq 1 900); do
        curl -fs "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "$2 did not become ready; see $OUT" >&2
    exit 1
}

start_cluster() { # run id
    DATA=$(mktemp -d /tmp/switchboard-bench-cluster-data.XXXXXX)
    local id=$1
    # The server reads every SWITCHBOARD_* variable as a setting and refuses unknown
    # ones, so the harness's secret variable must not reach it.
    local env=(env -u SWITCHBOARD_LOAD_SECRET
        SWITCHBOARD_DATA_DIR="$DATA"
        SWITCHBOARD_AUTH__HS256_SECRET="$SECRET"
        SWITCHBOARD_CLUSTER__CREDENTIAL="$CLUSTER_CREDENTIAL"
        SWITCHBOARD_LOG__LEVEL=warn
        SWITCHBOARD_GATEWAY__LISTEN=127.0.0.1:8080
        # Every generated client comes from 127.0.0.1: no per-address cap.
        SWITCHBOARD_GATEWAY__MAX_CONNECTIONS_PER_IP=0
        SWITCHBOARD_GATEWAY__ADMIN_LISTEN=127.0.0.1:19191
        SWITCHBOARD_PRESENCE__ADMIN_LISTEN=127.0.0.1:19192
        SWITCHBOARD_ROUTING__ADMIN_LISTEN=127.0.0.1:19193
        SWITCHBOARD_STORAGE__ADMIN_LISTEN=127.0.0.1:19194
        SWITCHBOARD_PRESENCE__BACKEND=redis
        SWITCHBOARD_PRESENCE__REDIS_KEY_PREFIX="sbbench$id"
        SWITCHBOARD_ROUTING__BACKEND=kafka
        SWITCHBOARD_ROUTING__KAFKA_TOPIC="sbbench-$id"
        SWITCHBOARD_ROUTING__KAFKA_GROUP="sbbench-$id"
        SWITCHBOARD_ROUTING__PARTITIONS="$PARTITIONS"
        SWITCHBOARD_STORAGE__BACKEND=scylla
        SWITCHBOARD_STORAGE__SCYLLA_KEYSPACE="sbbench_$id")
    "${env[@]}" "$SB" storage >"$OUT/storage-$id.log" 2>&1 & PIDS+=($!)
    wait_ready 19194 storage
    "${env[@]}" "$SB" presence >"$OUT/presence-$id.log" 2>&1 & PIDS+=($!)
    "${env[@]}" "$SB" routing >"$OUT/routing-$id.log" 2>&1 & PIDS+=($!)
    "${env[@]}" "$SB" gateway >"$OUT/gateway-$id.log" 2>&1 & PIDS+=($!)
    wait_ready 19192 presence
    wait_ready 19193 routing
    wait_ready 19191 gateway
}

# Mean latency per hop from the Prometheus histograms (_sum / _count).
hops() { # run id
    local id=$1
    for port in 19191 19192 19193 19194; do
        curl -fs "http://127.0.0.1:$port/metrics"
    done >"$OUT/metrics-$id.txt"
    loadtest/hops.py "$OUT/metrics-$id.txt"
}

if [ -n "$SCENARIO" ]; then
    status=0
    for file in $SCENARIO; do
        name=$(basename "$file" .toml)
        id="$(date +%s)s${name//[^a-z0-9]/}"
        echo "== $file ($id)" >&2
        start_cluster "$id"
        mkdir -p "$OUT/$name"
        # Targets the gateway started here, whatever the file names.
        "$LOAD" run "$file" --url ws://127.0.0.1:8080/v1/connect \
            --report-dir "$OUT/$name" "${SCENARIO_PHASES[@]}" || status=1
        hops "$id" | tee "$OUT/$name/hops.md"
        stop_all
    done
    echo "reports in $OUT" >&2
    exit $status
fi

for rate in $RATES; do
    id="$(date +%s)r$rate"
    echo "== $rate msg/s ($id)" >&2
    start_cluster "$id"
    "$LOAD" chat-1to1 --url ws://127.0.0.1:8080/v1/connect --clients "$CLIENTS" \
        --rate "$rate" --duration "$DURATION" --warmup "$WARMUP" --connect-rate 500 \
        --body-bytes 100 --json "$OUT/chat-$rate.json" | tee "$OUT/chat-$rate.txt" || true
    hops "$id" | tee "$OUT/hops-$rate.md"
    stop_all
done
echo "reports in $OUT" >&2
