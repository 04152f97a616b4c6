#!/usr/bin/env bash
# Benchmark: what a member that withholds its gradient costs, and how often the
# digest check has to repair a peer that closed a round on another contributor
# set. 4 peers, cnn, a Fashion-MNIST subset; a clean run, then the same run with
# peer 3 on --byzantine withhold (default straggler settings), then again with
# an outsider that heartbeats without a Hello. Prints one row per run.
#   bench/withhold.sh [OUT_DIR] [extra node args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-out/withhold}; shift || true
common=(--limit-train 12000 --limit-test 2000 --val-size 1000 --epochs 3 --batches-per-round 1 --seed 7 --device cpu "$@")
mkdir -p "$out"
target/release/testnet run --force --peers 4 --out "$out/clean" -- "${common[@]}" >/dev/null 2>"$out/clean.log" || true
target/release/testnet run --force --peers 4 --out "$out/withhold" --byzantine 3:withhold -- "${common[@]}" >/dev/null 2>"$out/withhold.log" || true
target/release/testnet run --force --peers 4 --out "$out/outsider" --rogues 1 --rogue-heartbeat -- "${common[@]}" >/dev/null 2>"$out/outsider.log" || true
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'run':<9} {'rounds':>6} {'deadline closures':>17} {'demoted':>8} {'unadmitted':>10} {'repairs':>7} {'max barrier s':>13} {'wall s':>7} {'accuracy (honest)':>17} honest digests equal")
for name in ("clean", "withhold", "outsider"):
    r = json.load(open(f"{out}/{name}/report.json"))
    honest = r["peer_reports"][:3] if name == "withhold" else r["peer_reports"]
    repairs = sum(p["rounds_log"] and json.load(open(f"{out}/{name}/nodes/n{p['index']}/report.json"))["state_syncs"] or 0 for p in honest)
    wait = max(x["stages"]["barrier_wait"] for p in honest for x in p["rounds_log"])
    digests = {p["final_digest"] for p in honest}
    print(f"{name:<9} {honest[0]['rounds']:>6} {len(r.get('deadline_rounds', [])):>17} {len(r.get('withholding_demotions', [])):>8} "
          f"{len(r.get('unadmitted_peers', [])):>10} {repairs:>7} {wait:>13.2f} {r['wall_seconds']:>7.0f} {100*honest[0]['final_test_accuracy']:>16.2f}% {len(digests) == 1}")
PY
