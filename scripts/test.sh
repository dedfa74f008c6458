#!/usr/bin/env bash
# The whole test suite: unit, simulation, property and end-to-end tests of every crate, the
# fuzz targets briefly, Autobahn conformance, a short pass of the fault campaign, a small
# capacity run, the browser client's unit tests and the two-person chat in real headless
# Chromium.
#
# Every step runs even when an earlier one failed (a failure in one test file must not hide
# the rest); the failures are listed at the end and the exit code is 1 if there was any.
# The build comes first: without binaries no later step can mean anything, so a failed build
# stops here.
set -uo pipefail
cd "$(dirname "$0")/.."

failed=()
step() {
  local name=$1
  shift
  echo "=== test.sh: $name" >&2
  local t0=$SECONDS
  if "$@"; then
    echo "=== test.sh: $name passed ($((SECONDS - t0)) s)" >&2
  else
    echo "=== test.sh: $name FAILED ($((SECONDS - t0)) s)" >&2
    failed+=("$name")
  fi
}

if ! cargo build --release --workspace --bins; then
  echo "test.sh: FAILED: the build; nothing else ran" >&2
  exit 1
fi
# Build every test binary once, then run each test target on its own (a failed one does not
# stop the others; `--no-fail-fast` would also do that, but one step per target names it).
if ! cargo test --workspace --no-run; then
  echo "test.sh: FAILED: building the tests; nothing else ran" >&2
  exit 1
fi
step "unit tests (lib, bins, loadgen)" cargo test --workspace --lib --bins
step "doc tests" cargo test --workspace --doc
for f in tests/*.rs; do
  t=$(basename "$f" .rs)
  # The simulation's seeds (tests/simulation.rs) run here too: 500 seeds by default.
  step "tests/$t.rs" cargo test -p switchboard --test "$t"
done
for f in loadgen/tests/*.rs; do
  t=$(basename "$f" .rs)
  step "loadgen/tests/$t.rs" cargo test -p loadgen --test "$t"
done
# Each fuzz target for a short bounded time (scripts/fuzz.sh; needs nightly + cargo-fuzz).
if rustup toolchain list 2>/dev/null | grep -q '^nightly' && command -v cargo-fuzz >/dev/null; then
  step "fuzz targets (${FUZZ_SECONDS:-20} s each)" bash scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
else
  echo "WARNING: fuzz targets NOT run: needs the nightly toolchain and cargo-fuzz" >&2
fi
step "Autobahn conformance" bash scripts/autobahn.sh target/autobahn
# The fault campaign, one short pass of every scenario (docs/chaos.md): fails if any
# acknowledged message is lost or doubled.
step "chaos campaign (short)" bash scripts/chaos.sh --short
# A small capacity run keeps the one-command C1M script from rotting; it fails unless every
# connection is established and none closes unexpectedly.
step "capacity run (20k)" bash scripts/capacity.sh 20000 --hold 10 --out target/capacity-ci
web_deps() {
  [ -d web/node_modules/playwright-core ] ||
    (cd web && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)
}
step "browser client and chat in Chromium" bash -c "$(declare -f web_deps); web_deps && cd web && node --test --test-timeout=120000 test/"

if [ ${#failed[@]} -gt 0 ]; then
  echo "test.sh: ${#failed[@]} step(s) FAILED:" >&2
  printf '  - %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "test.sh: every step passed" >&2
