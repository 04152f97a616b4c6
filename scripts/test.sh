#!/usr/bin/env bash
# The tests: installs what is missing, builds, runs every test of the workspace.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
source scripts/env.sh
cargo test --release --workspace "$@"
