#!/usr/bin/env python3
"""Samples kernel memory every second until SIGTERM, then writes JSON: the first sample and
the extremes (lowest MemFree, highest Slab, most TCP sockets and TCP memory pages).
Usage: kernel_sampler.py OUT.json"""
import json
import signal
import sys
import time


def sample():
    mem = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            mem[k] = int(v.split()[0]) * 1024
    tcp = {}
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                p = line.split()[1:]
                tcp = {p[i]: int(p[i + 1]) for i in range(0, len(p), 2)}
    return {
        "t": time.time(),
        "mem_free_bytes": mem["MemFree"],
        "mem_available_bytes": mem.get("MemAvailable", 0),
        "slab_bytes": mem["Slab"],
        "tcp_inuse": tcp.get("inuse", 0),
        "tcp_orphan": tcp.get("orphan", 0),
        "tcp_tw": tcp.get("tw", 0),
        "tcp_mem_pages": tcp.get("mem", 0),
    }


def main(out):
    first = sample()
    peak = dict(first)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        s = sample()
        if s["tcp_inuse"] > peak["tcp_inuse"]:
            peak.update({k: s[k] for k in ("tcp_inuse", "t")})
        peak["mem_free_bytes"] = min(peak["mem_free_bytes"], s["mem_free_bytes"])
        peak["slab_bytes"] = max(peak["slab_bytes"], s["slab_bytes"])
        peak["tcp_mem_pages"] = max(peak["tcp_mem_pages"], s["tcp_mem_pages"])
        with open(out, "w") as f:
            json.dump({"first": first, "peak": peak}, f, indent=1)
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1])
