#!/usr/bin/env bash
# Runs Switchboard's whole test suite on a machine that has only the language
# toolchains: installs what the tests need from the package registries, starts the
# real Redis, Kafka and Cassandra servers (deploy/local/up.sh), checks formatting and
# lints, runs every Rust test (unit, gRPC, conformance suites against the embedded and
# the real backends, multi-process end-to-end), then the headless-browser test of the
# chat page and the offline validation of the Helm chart and Dockerfile. Under CI (CI=true) it stops the servers it started when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

step "installing test tools"
# Debian packages the build and the tests need: chromium (the chat page's browser test),
# libssl-dev and pkg-config (librdkafka's TLS and SASL/SCRAM and the CQL driver's TLS
# link the system's OpenSSL).
packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
command -v pkg-config >/dev/null 2>&1 || packages+=(pkg-config)
dpkg-query -W -f='${Status}' libssl-dev 2>/dev/null | grep -q 'install ok installed' \
    || packages+=(libssl-dev)
if [ ${#packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
    else
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
    fi
fi
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

step "starting Redis, Kafka and Cassandra on 127.0.0.1"
if [ "${CI:-}" = "true" ]; then
    trap 'deploy/local/down.sh || true' EXIT
fi
deploy/local/up.sh
# The TLS tests read the CA and client certificate up.sh generated, wherever the
# servers live (LOCAL_SERVERS_DIR, default .local).
export SB_TEST_TLS_DIR="${SB_TEST_TLS_DIR:-${LOCAL_SERVERS_DIR:-$PWD/.local}/tls}"

step "feature sets of the server and benchmark builds"
scripts/check-feature-sets.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
# The load harness's smoke test runs the server binary: build it first.
cargo build --locked -p switchboard
cargo test --workspace --locked

step "browser test of the chat page"
SWITCHBOARD_BIN="$root/target/debug/switchboard" node --test tests/browser/

step "Helm chart and Dockerfile validation"
SWITCHBOARD_BIN="$root/target/debug/switchboard" deploy/helm/test.sh
