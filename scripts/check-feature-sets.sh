#!/usr/bin/env bash
# One release build serves the server and the load harness: the packages the server
# uses must get the same features whether it is built alone (`cargo run --release -p
# switchboard`) or with the harness (`cargo build --release -p switchboard -p
# switchboard-load`, the benchmark build). Otherwise the second command recompiles
# most of the tree. Prints the packages whose features differ and fails if any do.
set -euo pipefail
cd "$(dirname "$0")/.."

features() {
    cargo tree --locked --offline -e normal,build --prefix none -f '{p}|{f}' "$@" |
        sed 's/ (\*)$//' | sort -u
}
alone=$(features -p switchboard)
together=$(features -p switchboard -p switchboard-load)
# Only packages the server's own build has: the harness's additions do not matter.
differ=$(comm -23 <(echo "$alone") <(echo "$together"))
if [ -n "$differ" ]; then
    echo "features of these packages differ between -p switchboard and" >&2
    echo "-p switchboard -p switchboard-load (alone | with the harness):" >&2
    while IFS= read -r line; do
        name=${line%%|*}
        echo "  $line" >&2
        echo "$together" | grep -F "$name|" | sed 's/^/    with the harness: /' >&2
    done <<< "$differ"
    exit 1
fi
echo "feature sets of -p switchboard and -p switchboard -p switchboard-load agree"
