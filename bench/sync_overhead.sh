#!/usr/bin/env bash
# Benchmark: synchronisation overhead per round (everything but the gradient
# computation) at 2, 4 and 8 peers with cnn, from the nodes' own per-stage timings.
#   bench/sync_overhead.sh [OUT_DIR] [extra node args, e.g. --compression qsgd:bits=4]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-out/sync-overhead}; shift || true
for n in 2 4 8; do
  target/release/testnet run --peers "$n" --force --out "$out/p$n" -- \
    --limit-train 8000 --limit-test 500 --val-size 400 --epochs 1 --batches-per-round 1 --device cpu "$@" \
    >/dev/null 2>"$out.p$n.log" || true
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
stages = ["compute", "encode", "send", "barrier_wait", "decode", "aggregate", "update"]
print(f"{'peers':>5} {'rounds':>6} " + " ".join(f"{s + ' ms':>15}" for s in stages) + f" {'overhead ms':>12}")
for n in (2, 4, 8):
    r = json.load(open(f"{out}/p{n}/report.json"))
    ps = r["peer_reports"]
    mean = {s: 1000 * sum(p["mean_stage_seconds"].get(s, 0) for p in ps) / len(ps) for s in stages}
    # The barrier wait of the slowest peer is mostly waiting for the others'
    # computation on shared cores; the overhead counts every stage but compute.
    overhead = sum(v for k, v in mean.items() if k != "compute")
    rounds = ps[0]["rounds"]
    print(f"{n:>5} {rounds:>6} " + " ".join(f"{mean[s]:>15.1f}" for s in stages) + f" {overhead:>12.1f}")
PY
