#!/bin/sh
# Times `snigress policy suggest` and `policy diff` on one million access
# records (about 350 MB of JSON lines: 5 500 names, 31 callers).
#   bench/policy-tools.sh            # COUNT=1000000 by default
set -eu
cd "$(dirname "$0")/.."
COUNT=${COUNT:-1000000}
cargo build --release --quiet --bin snigress
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/access.log" "$COUNT" <<'PY'
import json, random, sys
random.seed(1)
names = [f"n{i}.svc{i % 50}.example.com" for i in range(5000)] + [f"x{i}.github.io" for i in range(500)]
callers = [None] + [f"spiffe://cluster.local/ns/ns{i}/sa/app" for i in range(30)]
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({
            "start_time": f"2026-12-01T10:{i % 60:02d}:00.000Z", "duration_ms": 3, "listener": "mesh",
            "mode": "mtls", "arrival": "tcp", "protocol": "tls", "client_addr": "10.1.2.3:40000",
            "sni": random.choice(names), "principal": random.choice(callers), "decision": "allowed",
            "reason": "allowed", "termination": "client_closed", "bytes_from_client": 1790,
            "bytes_to_client": 84211}, separators=(",", ":")) + "\n")
PY
printf 'listeners:\n  - {name: l, address: 127.0.0.1:0, mode: passthrough}\npolicy:\n  allow: ["*.example.com"]\n' > "$work/new.yaml"
echo "records: $COUNT ($(du -h "$work/access.log" | cut -f1))"
/usr/bin/time -f 'suggest --per-identity: %e s, %M KiB peak' target/release/snigress policy suggest \
    --access-log "$work/access.log" --per-identity > /dev/null
/usr/bin/time -f 'diff: %e s, %M KiB peak' target/release/snigress policy diff \
    --config "$work/new.yaml" --access-log "$work/access.log" > /dev/null || true
