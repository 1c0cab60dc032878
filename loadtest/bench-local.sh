#!/usr/bin/env bash
# Measure `switchboard standalone` on this machine with the load harness:
# chat-1to1 at several rates (a fresh server and data directory per rate), then
# 10,000 idle connections for the gateway's memory per connection.
#
#   cargo build --release -p switchboard -p switchboard-load
#   loadtest/bench-local.sh                 # reports land in $OUT
#   SCENARIO=loadtest/scenarios/groups.toml loadtest/bench-local.sh
#
# Environment: SB and LOAD (binaries), OUT (report directory), RATES (empty: no
# chat runs), CLIENTS, DURATION, WARMUP, IDLE_CLIENTS (0: no idle run), HOLD;
# other SWITCHBOARD_* variables reach the server (e.g. gateway buffer sizes).
# SCENARIO (one or more scenario files) replaces the chat and idle runs with
# `switchboard-load run` of each file against a fresh server, its report
# (report.md, report.json, SVG plots) in $OUT/<scenario name>/; DURATION and
# WARMUP replace the scenario's only when set. Everything targets 127.0.0.1 and
# stops by itself; the server is stopped after each run.
set -euo pipefail
cd "$(dirname "$0")/.."

SCENARIO=${SCENARIO:-}
# Only given values replace a scenario's own phases.
SCENARIO_PHASES=()
[ -n "${DURATION:-}" ] && SCENARIO_PHASES+=(--duration "$DURATION")
[ -n "${WARMUP:-}" ] && SCENARIO_PHASES+=(--warmup "$WARMUP")
SB=${SB:-target/release/switchboard}
LOAD=${LOAD:-target/release/switchboard-load}
OUT=${OUT:-$(mktemp -d /tmp/switchboard-bench.XXXXXX)}
RATES=${RATES-"500 1000 2000 4000"}
CLIENTS=${CLIENTS:-1000}
DURATION=${DURATION:-30s}
WARMUP=${WARMUP:-5s}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}
HOLD=${HOLD:-20s}
# Ports away from the defaults' 909x admin ports, which local Kafka may hold.
GATEWAY_ADMIN=127.0.0.1:19191
mkdir -p "$OUT"

# Both processes hold one descriptor per connection: as many as the hard limit
# allows (a sandbox may cap it; 10,000 connections need a bit over 10,000).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n')
export SWITCHBOARD_LOAD_SECRET=$SECRET
SERVER_PID=
DATA=

start_server() {
    DATA=$(mktemp -d /tmp/switchboard-bench-data.XXXXXX)
    # The server reads every SWITCHBOARD_* variable as a setting and refuses
    # unknown ones, so the harness's secret variable must not reach it. Every
    # generated client comes from 127.0.0.1: no per-address connection cap.
    env -u SWITCHBOARD_LOAD_SECRET \
    SWITCHBOARD_DATA_DIR="$DATA" \
    SWITCHBOARD_AUTH__HS256_SECRET="$SECRET" \
    SWITCHBOARD_DEV_MODE=false \
    SWITCHBOARD_LOG__LEVEL=warn \
    SWITCHBOARD_GATEWAY__LISTEN=127.0.0.1:8080 \
    SWITCHBOARD_GATEWAY__MAX_CONNECTIONS_PER_IP=0 \
    SWITCHBOARD_GATEWAY__ADMIN_LISTEN=$GATEWAY_ADMIN \
    SWITCHBOARD_PRESENCE__ADMIN_LISTEN=127.0.0.1:19192 \
    SWITCHBOARD_ROUTING__ADMIN_LISTEN=127.0.0.1:19193 \
    SWITCHBOARD_STORAGE__ADMIN_LISTEN=127.0.0.1:19194 \
        "$SB" standalone >"$OUT/standalone-$1.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        if curl -fs "http://$GATEWAY_ADMIN/readyz" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    echo "standalone did not become ready; see $OUT/standalone-$1.log" >&2
    return 1
}

stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
    if [ -n "$DATA" ]; then
        rm -rf "$DATA"
        DATA=
    fi
}
trap stop_server EXIT

status=0
if [ -n "$SCENARIO" ]; then
    for file in $SCENARIO; do
        name=$(basename "$file" .toml)
        start_server "$name"
        mkdir -p "$OUT/$name"
        # Targets the server started here, whatever the file names.
        "$LOAD" run "$file" --url ws://127.0.0.1:8080/v1/connect \
            --report-dir "$OUT/$name" --server-pid "$SERVER_PID" \
            "${SCENARIO_PHASES[@]}" || status=1
        # Where the time went, from the services' histograms.
        for port in 19191 19192 19193 19194; do
            curl -fs "http://127.0.0.1:$port/metrics" || true
        done >"$OUT/$name/metrics.txt"
        loadtest/hops.py "$OUT/$name/metrics.txt" | tee "$OUT/$name/hops.md"
        stop_server
    done
    echo "reports in $OUT"
    exit $status
fi

for rate in $RATES; do
    start_server "chat-$rate"
    "$LOAD" chat-1to1 --url ws://127.0.0.1:8080/v1/connect --clients "$CLIENTS" \
        --rate "$rate" --duration "$DURATION" --warmup "$WARMUP" --connect-rate 500 \
        --body-bytes 100 --server-pid "$SERVER_PID" --json "$OUT/chat-$rate.json" \
        | tee "$OUT/chat-$rate.txt" || status=1
    stop_server
done

if [ "$IDLE_CLIENTS" -gt 0 ]; then
    start_server idle
    "$LOAD" idle --url ws://127.0.0.1:8080/v1/connect --clients "$IDLE_CLIENTS" \
        --connect-rate 1000 --hold "$HOLD" --server-pid "$SERVER_PID" \
        --json "$OUT/idle.json" | tee "$OUT/idle.txt" || status=1
    stop_server
fi

echo "reports in $OUT"
exit $status
