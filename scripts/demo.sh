#!/usr/bin/env bash
# The demo: installs what is missing, then runs 4 p2pml-node peers on loopback
# (through testnet) that train the default cnn together on a subset of
# Fashion-MNIST, printing the test accuracy after each epoch. The report goes to
# out/demo/report.json. Extra arguments go to every node (e.g. --epochs 5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec target/release/testnet run --peers 4 --out out/demo --force -- \
  --limit-train 12000 --limit-test 2000 --val-size 1000 --epochs 3 --batches-per-round 1 --lr 0.02 "$@"
