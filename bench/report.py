#!/usr/bin/env python3
"""Turns bench/compare.sh measurements into bench/results.md.

Input: a TSV of scenario, mode, target, JSON result, proxy CPU clock ticks.
Output (stdout): Markdown tables of medians, run-to-run spreads (min..max)
and ratios to the peers and to a direct connection.
"""
import json
import os
import statistics
import sys
from collections import defaultdict

HZ = os.sysconf("SC_CLK_TCK")


def load(path):
    rows = defaultdict(list)
    with open(path) as f:
        for line in f:
            scenario, mode, target, result, ticks = line.rstrip("\n").split("\t")
            result = json.loads(result)
            if not result.get("failed"):
                rows[(scenario, mode, target)].append((result, int(ticks)))
    return rows


def med(values):
    return statistics.median(values) if values else float("nan")


def spread(values):
    return f"{min(values):.4g}..{max(values):.4g}" if values else "-"


def ratio(a, b):
    return f"{a / b:.2f}x" if b and a == a and b == b else "-"


def main():
    path, cores, runs, duration, concurrency, bulk_bytes, rate, workers, bulk_streams = sys.argv[1:10]
    rows = load(path)
    out = []
    out.append("# Load comparison\n")
    out.append(
        f"Machine: {cores} cores, loopback; {workers} worker(s) per proxy. {runs} runs per measurement, "
        f"interleaved across targets; median and run-to-run spread (min..max). Connection rate: "
        f"{concurrency} concurrent clients (closed loop) for {duration} s, each connection a full (outer "
        f"mTLS +) inner TLS handshake without resumption, an 8-byte request and a 100-byte response. "
        f"Bulk: {bulk_streams} connections downloading {int(bulk_bytes) >> 20} MiB between them. Latency: "
        f"open loop at {rate} connections/s for {duration} s. CPU: the proxy's own process tree "
        f"(user + system), from /proc. MB and GB are 10^6 and 10^9 bytes.\n"
    )

    present = {t for (_, _, t) in rows}

    def table(mode, peers):
        # Only targets measured (bench/compare.sh ONLY=... measures a few).
        peers = [p for p in peers if p in present]
        targets = [t for t in ["direct"] * (mode == "passthrough") + ["snigress"] + peers if t in present]
        if "snigress" not in targets:
            return
        out.append(f"\n## {mode}\n")
        out.append("| target | conn/s | CPU µs/conn | MB/s (bulk) | CPU s/GB | p50 ms | p99 ms | added p99 ms |")
        out.append("|---|---|---|---|---|---|---|---|")
        direct_p99 = med([r["p99_ms"] for r, _ in rows.get(("latency", "passthrough", "direct"), [])])
        stats = {}
        for t in targets:
            rate_rows = rows.get(("rate", mode, t), [])
            bulk_rows = rows.get(("bulk", mode, t), [])
            lat_rows = rows.get(("latency", mode, t), [])
            cps = [r["per_second"] for r, _ in rate_rows]
            cpu_conn = [ticks * 1e6 / HZ / max(r["connections"], 1) for r, ticks in rate_rows]
            mibs = [r["mib_per_second"] * 1.048576 for r, _ in bulk_rows]
            cpu_gib = [ticks / HZ / (r["bytes"] / 1e9) for r, ticks in bulk_rows]
            p50 = [r["p50_ms"] for r, _ in lat_rows]
            p99 = [r["p99_ms"] for r, _ in lat_rows]
            added = [p - direct_p99 for p in p99]
            stats[t] = dict(cps=med(cps), cpu_conn=med(cpu_conn), mibs=med(mibs), cpu_gib=med(cpu_gib),
                            p99=med(p99), added=med(added))
            direct = t == "direct"
            out.append(
                f"| {t} | {med(cps):.0f} ({spread(cps)}) | {'-' if direct else f'{med(cpu_conn):.0f} ({spread(cpu_conn)})'} "
                f"| {med(mibs):.0f} ({spread(mibs)}) | {'-' if direct else f'{med(cpu_gib):.2f} ({spread(cpu_gib)})'} "
                f"| {med(p50):.2f} | {med(p99):.2f} ({spread(p99)}) | {'-' if direct else f'{med(added):.2f}'} |"
            )
        s = stats["snigress"]
        out.append("")
        out.append("| snigress vs | conn/s | CPU per conn (lower is better) | throughput | CPU per GB | added p99 |")
        out.append("|---|---|---|---|---|---|")
        for t in [t for t in targets if t != "snigress"]:
            p = stats[t]
            out.append(
                f"| {t} | {ratio(s['cps'], p['cps'])} | {'-' if t == 'direct' else ratio(s['cpu_conn'], p['cpu_conn'])} "
                f"| {ratio(s['mibs'], p['mibs'])} | {'-' if t == 'direct' else ratio(s['cpu_gib'], p['cpu_gib'])} "
                f"| {'-' if t == 'direct' else ratio(s['added'], p['added'])} |"
            )

    baseline = any(t == "snigress-before" for (_, _, t) in rows)
    before = ["snigress-before"] if baseline else []
    # snigress behind a PROXY v2 header (as an ambient waypoint) against plain passthrough.
    table("passthrough", before + ["snigress-proxyv2", "haproxy", "nginx", "sniproxy"])
    table("mtls", before + ["haproxy", "nginx"])
    # HTTPS_PROXY clients: CONNECT, then TLS inside the tunnel.
    table("connect", ["squid"])

    counts = sorted({int(sc.split("-")[1]) for (sc, _, _) in rows if sc.startswith("streams-")})
    if counts:
        out.append("\n## passthrough: concurrent bulk streams\n")
        out.append(f"{int(bulk_bytes) >> 20} MiB in all, shared by N connections downloading at once.\n")
        out.append("| target | " + " | ".join(f"{n} streams: MB/s, CPU s/GB" for n in counts) + " |")
        out.append("|---|" + "---|" * len(counts))
        targets = sorted({t for (sc, m, t) in rows if sc.startswith("streams-")}, key=lambda t: (t != "snigress", t))
        for t in targets:
            cells = []
            for n in counts:
                items = rows.get((f"streams-{n}", "passthrough", t), [])
                mibs = [r["mib_per_second"] * 1.048576 for r, _ in items]
                cpu = [ticks / HZ / (r["bytes"] / 1e9) for r, ticks in items]
                cells.append(f"{med(mibs):.0f}, {'-' if t == 'direct' else f'{med(cpu):.2f} ({spread(cpu)})'}")
            out.append(f"| {t} | " + " | ".join(cells) + " |")

    out.append("\n## Memory per idle established connection\n")
    out.append("RSS growth over the connections held, on a freshly started proxy each run.\n")
    out.append("| mode | target | connections held | runs | KiB per connection |")
    out.append("|---|---|---|---|---|")
    idle = defaultdict(list)
    for (scenario, mode, target), items in sorted(rows.items()):
        if scenario != "idle":
            continue
        for r, _ in items:
            per = (r["rss_after_kib"] - r["rss_before_kib"]) / max(r["held"], 1)
            idle[(mode, target, r["count"])].append((per, r["held"]))
    for (mode, target, count), items in sorted(idle.items()):
        per = [p for p, _ in items]
        held = min(h for _, h in items)
        out.append(f"| {mode} | {target} | {held} of {count} | {len(per)} | {med(per):.2f} ({spread(per)}) |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
