#!/usr/bin/env bash
# Chaos benchmark: 8 peers (cnn, Fashion-MNIST), 10 random SIGKILLs each revived
# 3 s later (20 events, seeded) and one 30 s partition 5|3, against the same
# run without faults. Prints both testnet summaries (the fault table included)
# and the accuracy comparison.
#   bench/chaos.sh [OUT_DIR] [extra node args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-out/chaos}; shift || true
mkdir -p "$out"
args=(--data-dir /usr/share/datasets/fashion-mnist --limit-train 16000 --limit-test 2000 --val-size 1000
      --epochs 4 --batches-per-round 1 --device cpu "$@")
echo "== fault-free reference"
target/release/testnet run --peers 8 --force --out "$out/clean" -- "${args[@]}" 2>"$out/clean.log" || true
echo "== chaos: --random-kills 10 --interval 5 --down 3 --fault-seed 7 --partition 0,1,2,3,4|5,6,7@60+30"
target/release/testnet run --peers 8 --force --out "$out/chaos" --random-kills 10 --interval 5 --down 3 --fault-seed 7 \
  --partition "0,1,2,3,4|5,6,7@60+30" -- "${args[@]}" 2>"$out/chaos.log" || true
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
clean = json.load(open(f"{out}/clean/report.json"))
chaos = json.load(open(f"{out}/chaos/report.json"))
acc = lambda r: r["peer_reports"][0]["final_test_accuracy"]
print(f"fault-free: {clean['peer_reports'][0]['rounds']} rounds, {clean['wall_seconds']:.0f} s, accuracy {100*acc(clean):.2f}%")
print(f"chaos:      {chaos['peer_reports'][0]['rounds']} rounds, {chaos['wall_seconds']:.0f} s, accuracy {100*acc(chaos):.2f}%"
      f" (difference {100*(acc(chaos)-acc(clean)):+.2f} pp)")
print(f"chaos: survivors {len(chaos['peer_reports'])} of 8 reported, final digests equal: {chaos['all_final_digests_equal']},"
      f" rounds with equal digests {chaos['rounds_with_equal_digests']} of {chaos['common_rounds']}, problems: {chaos['problems']}")
ev = chaos["faults"]
det = [e["detection_last_s"] for e in ev if e.get("detection_last_s") is not None]
dm = [e["digest_match_s"] for e in ev if e.get("digest_match_s") is not None]
if det: print(f"detection (last peer): mean {sum(det)/len(det):.2f} s, max {max(det):.2f} s over {len(det)} kills")
if dm: print(f"revived peer in step: mean {sum(dm)/len(dm):.2f} s, max {max(dm):.2f} s over {len(dm)} revivals")
PY
