#!/usr/bin/env bash
# The demo: installs what is missing, then trains the default model on
# Fashion-MNIST and writes the model and a report to out/demo.
# Extra arguments go to `p2pml-node train` (e.g. --epochs 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec target/release/p2pml-node train --out out/demo "$@"
