#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 60) from the seed corpora in
# fuzz/seeds (inputs taken from the tests). Needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`). Exits non-zero when a target finds a crash; the input is in
# fuzz/artifacts/<target>/ — turn it into a regression test.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(http_request frame_decoder protocol_parser session)
cargo +nightly fuzz build -O >/dev/null
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log="target/fuzz-$t.log"
  mkdir -p target
  echo "fuzz: $t for ${secs}s"
  if ! cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1; then
    echo "fuzz: $t FAILED; see fuzz/$log and fuzz/artifacts/$t/" >&2
    tail -30 "$log" >&2
    status=1
  fi
  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+ +DONE" "$log" | sed "s/^/fuzz: $t: /" || true
done
exit $status
