#!/usr/bin/env python3
"""Prints the capacity report from loadgen's summary.json files and the kernel samples, writes
capacity.json, and exits 1 unless every connection was established and none closed unexpectedly.
Usage: capacity_report.py OUT_DIR N"""
import json
import os
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def main(out, n):
    ws = load(os.path.join(out, "ws", "summary.json"))
    base_path = os.path.join(out, "tcp", "summary.json")
    base = load(base_path) if os.path.exists(base_path) else None
    kern = load(os.path.join(out, "kernel.json"))
    c = ws["connections"]
    srv = ws.get("server") or {}
    lg = ws.get("loadgen") or {}
    first, peak = kern["first"], kern["peak"]
    held = max(c["peak_open"], 1)
    kernel_used = first["mem_free_bytes"] - peak["mem_free_bytes"]
    slab = peak["slab_bytes"] - first["slab_bytes"]
    report = {
        "connections_target": n,
        "established": c["established"],
        "failed": c["failed"],
        "peak_open": c["peak_open"],
        "unexpected_closes": ws["unexpected_closes"],
        "connect_seconds": round(c["connect_seconds"], 2),
        "ws_connect_rate_per_s": round(c["connect_rate_per_s"]),
        "tcp_baseline_connect_rate_per_s": round(base["connections"]["connect_rate_per_s"]) if base else None,
        "server_rss_peak_bytes": srv.get("rss_peak_bytes"),
        "server_bytes_per_connection": round(srv.get("bytes_per_connection") or 0, 1),
        "server_cpu_seconds": srv.get("cpu_seconds"),
        "loadgen_rss_bytes": lg.get("rss_end_bytes"),
        "loadgen_bytes_per_connection": round(lg.get("bytes_per_connection") or 0, 1),
        "loadgen_cpu_seconds": lg.get("cpu_seconds"),
        "kernel_memfree_drop_bytes": kernel_used,
        "kernel_slab_growth_bytes": slab,
        "kernel_bytes_per_connection_pair": round(kernel_used / held),
        "kernel_slab_bytes_per_connection_pair": round(slab / held),
        "tcp_sockets_peak": peak["tcp_inuse"],
        "tcp_mem_pages_peak": peak["tcp_mem_pages"],
        "connect_histogram_us": ws["histograms"]["connect"],
        "messages": ws["messages"] if ws["scenario"] != "connect" else None,
        "latency_histogram_us": {k: v for k, v in ws["histograms"].items() if k != "connect"} or None,
    }
    with open(os.path.join(out, "capacity.json"), "w") as f:
        json.dump(report, f, indent=1)
    mib = lambda b: f"{(b or 0) / 2**20:.0f} MiB"
    print("=" * 72)
    print(f"capacity run: {n} connections (scenario {ws['scenario']})")
    print(f"  established            {c['established']} (failed {c['failed']}, peak open {c['peak_open']})")
    print(f"  unexpected closes      {ws['unexpected_closes']['total']} {ws['unexpected_closes']['by_code']}")
    print(f"  connect+upgrade rate   {report['ws_connect_rate_per_s']}/s over {report['connect_seconds']} s"
          + (f"   (plain TCP baseline, same run: {report['tcp_baseline_connect_rate_per_s']}/s)" if base else ""))
    h = ws["histograms"]["connect"]
    print(f"  connect latency        p50 {h['p50']/1000:.1f} ms  p99 {h['p99']/1000:.1f} ms  max {h['max']/1000:.1f} ms")
    print(f"  server RSS             peak {mib(srv.get('rss_peak_bytes'))}, {report['server_bytes_per_connection']} B per connection")
    print(f"  loadgen RSS            {mib(lg.get('rss_end_bytes'))}, {report['loadgen_bytes_per_connection']} B per connection")
    print(f"  kernel memory          MemFree -{mib(kernel_used)} ({report['kernel_bytes_per_connection_pair']} B per client+server pair), "
          f"Slab +{mib(slab)} ({report['kernel_slab_bytes_per_connection_pair']} B per pair)")
    print(f"  sockets                TCP inuse peak {peak['tcp_inuse']}, tcp_mem peak {peak['tcp_mem_pages']} pages")
    print(f"  CPU                    server {srv.get('cpu_seconds', 0):.1f} s, loadgen {lg.get('cpu_seconds', 0):.1f} s")
    if report["messages"]:
        m = report["messages"]
        print(f"  messages               sent {m['sent']} received {m['received']} missing {m['missing']} duplicates {m['duplicates']}")
        for k, v in (report["latency_histogram_us"] or {}).items():
            print(f"  {k:<22} p50 {v['p50']/1000:.3f} ms  p99 {v['p99']/1000:.3f} ms  p99.9 {v['p999']/1000:.3f} ms  max {v['max']/1000:.3f} ms")
    print(f"  files                  {out}/ (capacity.json, ws/*.hgrm, ws/summary.json, kernel.json)")
    print("=" * 72)
    ok = c["established"] >= n and c["failed"] == 0 and ws["unexpected_closes"]["total"] == 0
    if report["messages"]:
        ok = ok and report["messages"]["missing"] == 0
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
