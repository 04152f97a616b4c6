#!/usr/bin/env bash
# The PS-vs-P2P fault-tolerance experiment: the same run (4 peers / 4 workers,
# cnn, Fashion-MNIST 16,000 samples, 3 epochs, QSGD 4 bits) without faults and
# under two fault schedules, each in P2P mode and in parameter-server mode:
#   random: 6 random SIGKILLs, one every 15 s, each node down 8 s (seeded; in
#           PS mode the server is drawn as often as any worker);
#   server: the server killed at 30 s and revived 15 s later (P2P: peer 0).
# Writes OUT/{none,random,server}/compare.{md,json}, accuracy.svg, progress.svg.
#   bench/compare.sh [OUT_DIR] [extra node args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-out/compare}; shift || true
mkdir -p "$out"
args=(--data-dir /usr/share/datasets/fashion-mnist --limit-train 16000 --limit-test 2000 --val-size 1000
      --epochs 3 --batches-per-round 1 --compression qsgd:bits=4 --device cpu "$@")
echo "== no faults"
target/release/testnet compare --peers 4 --force --out "$out/none" --target-accuracy 0.75 -- "${args[@]}" 2>"$out/none.log" || true
echo "== random kills"
target/release/testnet compare --peers 4 --force --out "$out/random" --target-accuracy 0.75 \
  --random-kills 6 --interval 15 --down 8 --fault-seed 3 -- "${args[@]}" 2>"$out/random.log" || true
echo "== the server killed for 15 s"
target/release/testnet compare --peers 4 --force --out "$out/server" --target-accuracy 0.75 \
  --kill ps@30 --revive ps@+15 -- "${args[@]}" 2>"$out/server.log" || true
