#!/usr/bin/env bash
# The whole test suite: unit, simulation, property and end-to-end tests of every crate, the
# fuzz targets briefly, Autobahn conformance, the browser client's unit tests and the
# two-person chat in real headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
cargo test --workspace
# The simulation's seeds (tests/simulation.rs) run above: 200 seeds by default.
# Each fuzz target for a short bounded time (scripts/fuzz.sh; needs nightly + cargo-fuzz).
if rustup toolchain list 2>/dev/null | grep -q '^nightly' && command -v cargo-fuzz >/dev/null; then
  bash scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
else
  echo "WARNING: fuzz targets NOT run: needs the nightly toolchain and cargo-fuzz" >&2
fi
bash scripts/autobahn.sh target/autobahn
# A small capacity run keeps the one-command C1M script from rotting; it fails unless every
# connection is established and none closes unexpectedly.
bash scripts/capacity.sh 20000 --hold 10 --out target/capacity-ci
[ -d web/node_modules/playwright-core ] || (cd web && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)
(cd web && node --test --test-timeout=120000 test/)
