#!/usr/bin/env bash
# Runs the Autobahn TestSuite cases (517, via `kosoku`) against `switchboard --echo --deflate`
# and checks every verdict with scripts/autobahn_check.py. Usage: scripts/autobahn.sh [OUT_DIR]
# --deflate-min-bytes 0: every echo goes back compressed. kosoku's sections 12 and 13 fail with
# a Python error ("Strings must be encoded before hashing") when a message comes back
# uncompressed in a deflate session, which RFC 7692 allows and the server's default does for
# messages under 256 bytes or that do not shrink.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/autobahn}
bin=${SWITCHBOARD_BIN:-target/release/switchboard}
[ -x "$bin" ] || cargo build --release --bin switchboard
command -v kosoku >/dev/null || { echo "kosoku missing: pip install kosoku" >&2; exit 2; }
rm -rf "$out" && mkdir -p "$out"
"$bin" --echo --deflate --deflate-min-bytes 0 --listen 127.0.0.1:0 --max-message-bytes 16777216 --max-outbound-bytes 67108864 \
  >"$out/server.out" 2>"$out/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  addr=$(awk '/listening on/ {print $4; exit}' "$out/server.out")
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "${addr:-}" ] || { echo "server did not start" >&2; cat "$out/server.log" >&2; exit 1; }
echo "autobahn: running 517 cases against $addr"
timeout 900 kosoku -p 2 -o "$out/reports" "$addr" >"$out/kosoku.log" 2>&1 || true
python3 scripts/autobahn_check.py "$out/reports/index.json" "${AUTOBAHN_SUMMARY:-$out/summary.md}"
