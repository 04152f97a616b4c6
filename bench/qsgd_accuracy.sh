#!/usr/bin/env bash
# Benchmark: does the default compression cost accuracy? 4 peers train cnn on the
# full Fashion-MNIST for 3 epochs, once with plain f32 gradients (--compression
# none) and once with the default (no --compression flag: qsgd 4-bit), same seed,
# in one run; prints final accuracy and gradient bytes on the wire for both.
#   bench/qsgd_accuracy.sh [OUT_DIR] [extra node args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-out/qsgd-accuracy}; shift || true
common=(--epochs 3 --batches-per-round 1 --lr 0.02 --seed 7 --device cpu "$@")
mkdir -p "$out"
for name in none qsgd; do
  flag=(); [ "$name" = none ] && flag=(--compression none)
  target/release/testnet run --force --peers 4 --out "$out/$name" -- "${common[@]}" "${flag[@]}" >/dev/null 2>"$out/$name.log" || true
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for name in ("none", "qsgd"):
    r = json.load(open(f"{out}/{name}/report.json"))
    p = r["peer_reports"][0]
    node = json.load(open(f"{out}/{name}/nodes/n0/report.json"))
    rows[name] = (r["accuracy_by_epoch"], p["gradient_bytes_sent"], p["rounds"], r["wall_seconds"], r["ok"], node["spec"]["compression"])
print(f"{'run':<6} {'compression (from the node report)':<34} {'accuracy by epoch':<28} {'grad bytes/peer':>16} {'rounds':>7} {'wall s':>7} ok")
for name, (acc, b, rounds, wall, ok, spec) in rows.items():
    print(f"{name:<6} {spec:<34} {' -> '.join(f'{100*a:.2f}%' for a in acc):<28} {b:>16} {rounds:>7} {wall:>7.0f} {ok}")
d = 100 * (rows["qsgd"][0][-1] - rows["none"][0][-1])
print(f"final accuracy difference qsgd - none: {d:+.2f} pp (target: within 0.5 pp)")
print(f"gradient bytes ratio none/qsgd: {rows['none'][1] / max(rows['qsgd'][1], 1):.2f}x")
PY
