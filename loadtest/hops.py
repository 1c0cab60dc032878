#!/usr/bin/env python3
"""Mean latency per hop of the message path, from the services' Prometheus text.

Usage: loadtest/hops.py METRICS.txt   (the /metrics output of every service, concatenated)

Prints a Markdown table: each histogram's _sum / _count (in ms, or in its unit). Used by bench-local.sh and
bench-cluster.sh after each run; hops a backend does not have are left out.
"""
import re
import sys

HOPS = [
    ("gateway: accept -> delivered to a session (send_to_deliver)", "switchboard_gateway_send_to_deliver_seconds"),
    ("routing: log append (log_append)", "switchboard_routing_log_append_seconds"),
    ("routing: storage AppendBatch round trip, per call (storage_append)", "switchboard_routing_storage_append_seconds"),
    ("routing: records per AppendBatch call", "switchboard_routing_storage_append_batch_records", "records"),
    ("storage: backend append batch (the commit point), per call", 'switchboard_storage_backend_duration_seconds{op="append_batch"}'),
    ("storage: backend single append", 'switchboard_storage_backend_duration_seconds{op="append"}'),
    ("storage: backend dedupe lookup", 'switchboard_storage_backend_duration_seconds{op="lookup_dedupe"}'),
    ("storage: backend last seq", 'switchboard_storage_backend_duration_seconds{op="last_seq"}'),
    ("presence: RouteConversation (interest index)", 'switchboard_presence_rpc_seconds{method="route_conversation"}'),
]


def main(path):
    sums, counts = {}, {}
    with open(path) as f:
        for line in f:
            m = re.match(r"^(\w+)_(sum|count)(\{[^}]*\})? ([0-9.e+-]+)$", line.strip())
            if not m:
                continue
            key = m.group(1) + (m.group(3) or "")
            (sums if m.group(2) == "sum" else counts)[key] = float(m.group(4))
    print("| hop | calls | mean |")
    print("|---|---:|---:|")
    for name, key, *unit in HOPS:
        c = counts.get(key, 0)
        if not c:
            continue
        mean = sums.get(key, 0) / c
        shown = f"{mean:.2f} {unit[0]}" if unit else f"{mean * 1000:.2f} ms"
        print(f"| {name} | {int(c)} | {shown} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
