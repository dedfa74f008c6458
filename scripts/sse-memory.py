#!/usr/bin/env python3
"""Server memory per idle SSE connection: opens N event streams (each subscribed to one of 10
channels, named users), reads each response head, samples the server's RSS growth, and prints
bytes per connection and connections per GiB. Usage: sse-memory.py HOST:PORT SERVER_PID [N]"""
import resource
import socket
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    pid = int(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 10000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(n, hard - 100)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    before = rss_kib(pid)
    socks = []
    deadline = time.time() + 120
    for i in range(n):
        s = socket.create_connection((host, int(port)))
        s.sendall(f"GET /events?user=sse{i}&channel=c{i % 10} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        socks.append(s)
    for s in socks:
        s.settimeout(max(1, deadline - time.time()))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("stream closed early")
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head[:40]
    time.sleep(1)
    after = rss_kib(pid)
    per = (after - before) * 1024 / n
    print(f"sse_connections={n} server_rss_before_kib={before} server_rss_after_kib={after} "
          f"bytes_per_connection={per:.0f} connections_per_gib={(1 << 30) / per:.0f}")
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
