#!/usr/bin/env bash
# Benchmark: 4 peers on the full Fashion-MNIST (cnn, 3 epochs, batch 64 per peer,
# one exchange per batch, SGD momentum 0.9, lr 0.04 = 0.01 x 4 peers) against the
# single-process run of the same network (lr 0.01, batch 64), in one run:
# accuracy of every peer, digests, both wall times and their ratio.
#   bench/p2p_vs_standalone.sh [OUT_DIR] [extra node args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-out/p2p-vs-standalone}; shift || true
mkdir -p "$out"
t0=$(date +%s.%N)
target/release/p2pml-node train --device cpu --epochs 3 --out "$out/standalone" >"$out/standalone.log" 2>&1
t1=$(date +%s.%N)
target/release/testnet run --peers 4 --force --out "$out/p2p" -- --epochs 3 --batches-per-round 1 --lr 0.04 --device cpu "$@" \
  >"$out/p2p.log" 2>&1 || true
t2=$(date +%s.%N)
python3 - "$out" "$t0" "$t1" "$t2" <<'PY'
import json, sys
out, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
s = json.load(open(f"{out}/standalone/report.json"))
r = json.load(open(f"{out}/p2p/report.json"))
print(f"standalone: test accuracy {100*s['epochs'][-1]['test']['accuracy']:.2f}%, wall {t1-t0:.0f} s")
for p in r["peer_reports"]:
    print(f"peer {p['index']}: test accuracy {100*p['final_test_accuracy']:.2f}%, rounds {p['rounds']}")
print(f"p2p (4 peers): digests equal in {r['rounds_with_equal_digests']} of {r['common_rounds']} rounds, wall {t2-t1:.0f} s")
print(f"wall ratio p2p/standalone: {(t2-t1)/(t1-t0):.2f} (target <= 1.15)")
PY
