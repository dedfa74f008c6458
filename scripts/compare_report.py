#!/usr/bin/env python3
"""Turns scripts/compare.sh's results.jsonl into docs/benchmarks.md and one SVG bar chart per
measure (medians over the runs; every run's figure is listed too).

    compare_report.py RESULTS.jsonl OUT.md SVG_DIR
"""
import json
import os
import statistics
import sys
import time
from html import escape

SERVERS = ["switchboard", "switchboard-1", "switchboard-before", "switchboard-1-before",
           "uwebsockets", "tokio-tungstenite", "fastwebsockets", "node-ws",
           "uwebsockets-socketify"]
THREADS = {"switchboard": "2 shards", "switchboard-1": "1 shard",
           "switchboard-before": "2 shards", "switchboard-1-before": "1 shard",
           "tokio-tungstenite": "2", "fastwebsockets": "2", "node-ws": "1", "uwebsockets": "1",
           "uwebsockets-socketify": "1"}
# (measure, field, plot file, title, unit, lower is better)
METRICS = [
    ("connect", "bytes_per_connection", "bytes_per_connection",
     "Idle memory per connection (15k)", "B", True),
    ("connect", "connect_seconds", "connect_seconds", "Time to open 15k connections", "s", True),
    ("flood", "echoed_per_s", "echoed_per_s", "Flood: echoed messages per second", "msg/s",
     False),
    ("flood", "cpu_ns_per_message", "cpu_ns_per_message", "Flood: server CPU per message", "ns",
     True),
    ("flood-deep", "echoed_per_s", "deep_echoed_per_s",
     "Flood, 1024 in flight: echoed messages per second", "msg/s", False),
    ("flood-deep", "cpu_ns_per_message", "deep_cpu_ns_per_message",
     "Flood, 1024 in flight: server CPU per message", "ns", True),
    ("flood-combined", "echoed_per_s", "combined_echoed_per_s",
     "Flood, write-combined: echoed messages per second", "msg/s", False),
    ("flood-combined", "cpu_ns_per_message", "combined_cpu_ns_per_message",
     "Flood, write-combined: server CPU per message", "ns", True),
    ("latency", "p50_us", "p50_us", "Echo latency p50 at 20k msg/s", "µs", True),
    ("latency", "p99_us", "p99_us", "Echo latency p99 at 20k msg/s", "µs", True),
    ("latency", "p999_us", "p999_us", "Echo latency p99.9 at 20k msg/s", "µs", True),
]


def load(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = {}
    for r in rows:
        if not r.get("ok"):
            continue
        if r["measure"] == "connect" and r.get("established") != r.get("target"):
            continue  # a run that did not open every connection measures nothing comparable
        for m, field, *_ in METRICS:
            if r["measure"] == m and field in r:
                by.setdefault((r["server"], m, field), []).append(r[field])
    return rows, by


def fmt(v, unit):
    if unit == "msg/s":
        return f"{v / 1e6:.2f}M"
    if unit == "s":
        return f"{v:.2f}"
    return f"{v:,.0f}"


def svg_bars(title, unit, values, lower_better):
    """A horizontal bar chart: one bar per server, the median, labelled."""
    w, bar, gap, left, top = 640, 26, 10, 150, 40
    h = top + len(values) * (bar + gap) + 20
    top_v = max(v for _, v in values) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="13">',
           f'<text x="10" y="22" font-weight="bold">{escape(title)} ({escape(unit)}, '
           f'{"lower" if lower_better else "higher"} is better)</text>']
    for i, (name, v) in enumerate(values):
        y = top + i * (bar + gap)
        bw = max(1, (w - left - 90) * v / top_v)
        color = "#2b6cb0" if name.startswith("switchboard") else "#a0aec0"
        out.append(f'<text x="10" y="{y + bar * 0.7:.0f}">{escape(name)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{bw:.1f}" height="{bar}" fill="{color}"/>')
        out.append(f'<text x="{left + bw + 6:.1f}" y="{y + bar * 0.7:.0f}">'
                   f'{escape(fmt(v, unit))}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    results, md_path, svg_dir = sys.argv[1:4]
    rows, by = load(results)
    runs = max((r["run"] for r in rows), default=0)
    os.makedirs(svg_dir, exist_ok=True)
    present = [s for s in SERVERS if any(k[0] == s for k in by)]
    lines = [
        "# Benchmarks: switchboard against the servers users pick instead",
        "",
        f"Written by `scripts/compare.sh {runs}` on {time.strftime('%Y-%m-%d')}: this 2-core "
        "machine, loadgen beside each server on loopback, every server started fresh for each "
        "measure, the order rotating from run to run. Each figure is the median of the runs "
        "(every run is in `target/compare/results.jsonl` and listed below). `uwebsockets` "
        "is uWebSockets built natively from source (`benches/peers/uws-native/`, uSockets' "
        "epoll loop): the speed anchor. `uwebsockets-socketify` is the build that PyPI's "
        "`socketify` 0.0.31 ships (uWebSockets and uSockets in one shared library, libuv as "
        "the event loop), driven from C (`benches/peers/uws/`).",
        "",
        "| server | threads | " + " | ".join(f"{t} ({u})" for _, _, _, t, u, _ in METRICS)
        + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for s in present:
        cells = []
        for m, field, _, _, unit, _ in METRICS:
            # A figure the run could not give (null) is left out of the median.
            v = [x for x in by.get((s, m, field)) or [] if x is not None]
            cells.append(fmt(statistics.median(v), unit) if v else "–")
        lines.append(f"| {s} | {THREADS[s]} | " + " | ".join(cells) + " |")
    short = {}
    for r in rows:
        if r.get("ok") and r["measure"] == "connect" and r.get("established") != r.get("target"):
            short.setdefault(r["server"], []).append(r["established"])
    for s, opened in short.items():
        lines += ["", f"{s}: {len(opened)} connect run(s) did not open all connections "
                  f"(opened {', '.join(f'{n:,}' for n in opened)}); a run that did not is "
                  "left out of its memory and time figures (\u2013: no run did)."]
    lines += ["", "Plots (medians):", ""]
    for m, field, plot, title, unit, lower in METRICS:
        values = [(s, statistics.median(known)) for s in present
                  if (known := [x for x in by.get((s, m, field)) or [] if x is not None])]
        if not values:
            continue
        name = f"{plot}.svg"
        with open(os.path.join(svg_dir, name), "w") as f:
            f.write(svg_bars(title, unit, values, lower))
        lines.append(f"![{title}](benchmarks/{name})")
    flames = sorted(f for f in os.listdir(svg_dir) if f.startswith("flame-") and f.endswith(".svg"))
    if flames:
        lines += ["", "## Where switchboard's CPU goes", "",
                  "Flame graphs of `switchboard --echo --shards 1` under each measure (kernel "
                  "included: on loopback the sender also pays for the receiver's softirq), "
                  "written by `scripts/flame.sh` (perf with DWARF call graphs, inferno), not by "
                  "this script's run:", ""]
        lines += [f"- [{f[len('flame-'):-len('.svg')]}](benchmarks/{f})" for f in flames]
    lines += ["", "## Every run", "", "```"]
    lines += [json.dumps(r) for r in rows]
    lines += ["```", "", "## How each figure is taken", "",
              "- **Idle memory per connection**: `loadgen connect --connections 15000` holds them "
              "10 s; the server's RSS peak minus its RSS before the run, over 15,000.",
              "- **Time to open**: loadgen's connect time for all 15,000 (50,000/s offered).",
              "- **Flood**: `loadgen flood --connections 200 --window 64 --duration 15s` (32 B "
              "messages, each echo answered by the next message, many frames per write); the "
              "server's CPU from /proc over the run, divided by the echoed messages. **Flood, 1024 "
              "in flight** is the same with `--window 1024`: more frames per read and per "
              "write, so the kernel's cost per call is spread over more messages. **Flood, "
              "write-combined** is `--write-combined` (tcpkali-style, no window: each "
              "connection keeps its socket's send buffer full of frames, 16 KiB per write, and "
              "counts the echoes; TCP's flow control is the only limit).",
              "- **Latency**: `loadgen echo --connections 200 --rate 20000 --duration 15s`, open "
              "loop, from each message's scheduled send time, one loadgen worker (the default at "
              "this rate; it spins the last 50 µs before each send); loadgen's own send lateness "
              "is in each run's row (`lateness_p99_us`).",
              "",
              "Every peer runs with its defaults, as a user would start it (the sources are in "
              "`benches/peers/`). tokio-tungstenite's `WebSocketConfig` gives each connection a "
              "128 KiB read buffer by default (`read_buffer_size`): that is most of its idle "
              "memory here. switchboard runs `--echo --shards 2 --fd-table per-shard` "
              "(`switchboard-1`: `--shards 1`). `uwebsockets` is the native build (uWebSockets "
              "66dcff3 on uSockets 86097c4, its epoll loop, `-O3 -flto`, from "
              "`benches/peers/uws-native/`): one thread, compression off, no backpressure "
              "limit. `uwebsockets-socketify` is the library PyPI's socketify ships (on "
              "libuv), kept for comparison with earlier tables.",
              ""]
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {md_path} and {len(METRICS)} plots in {svg_dir}")


if __name__ == "__main__":
    main()
