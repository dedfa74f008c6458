#!/usr/bin/env bash
# The whole test suite: unit and end-to-end tests of every crate, then Autobahn conformance.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
cargo test --workspace
bash scripts/autobahn.sh target/autobahn
