#!/usr/bin/env bash
# Byzantine-robustness experiment: 8 peers (cnn, Fashion-MNIST, 16k samples,
# 4 epochs), peer 3 byzantine sending -10 times its gradient (sign-flip:10),
# under each aggregation rule, against the same run without the attacker.
# Prints one table of final test accuracies (docs/byzantine.md holds a run).
#   bench/byzantine.sh [OUT_DIR] [extra node args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-out/byzantine}; shift || true
mkdir -p "$out"
args=(--data-dir /usr/share/datasets/fashion-mnist --limit-train 16000 --limit-test 2000 --val-size 1000
      --epochs 4 --batches-per-round 1 --device cpu --failure-timeout-ms 8000 "$@")
run() { # NAME RULE [testnet args...]
  local name=$1 rule=$2; shift 2
  echo "== $name: testnet run --peers 8 $* -- ... --aggregation $rule"
  target/release/testnet run --peers 8 --out "$out/$name" "$@" -- "${args[@]}" --aggregation "$rule" \
    2>"$out/$name.log" || echo "   (testnet exited non-zero; see $out/$name.log)"
}
run clean mean
for rule in mean median trimmed-mean:0.125 krum:1; do
  run "byz-${rule%%:*}" "$rule" --byzantine 3:sign-flip:10
done
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    p = f"{out}/{name}/report.json"
    return json.load(open(p)) if os.path.exists(p) else None
def honest(r):
    return [p for p in r["peer_reports"] if p.get("index") != 3] if r else []
clean = load("clean")
ref = max((p["final_test_accuracy"] for p in honest(clean)), default=None)
print("| aggregation | byzantine | rounds | final test accuracy (honest peers) | vs clean | wall s | digests equal |")
print("|---|---|---|---|---|---|---|")
for name, rule, byz in [("clean", "mean", "none"), ("byz-mean", "mean", "3:sign-flip:10"), ("byz-median", "median", "3:sign-flip:10"),
                        ("byz-trimmed-mean", "trimmed-mean:0.125", "3:sign-flip:10"), ("byz-krum", "krum:1", "3:sign-flip:10")]:
    r = load(name)
    hs = honest(r)
    if not hs:
        print(f"| {rule} | {byz} | - | no report | - | - | - |"); continue
    accs = [p["final_test_accuracy"] for p in hs]
    a = min(accs)
    rounds = max(p["rounds"] for p in hs)
    diff = f"{100*(a-ref):+.2f} pp" if ref is not None else "-"
    spread = f"{100*a:.2f} %" if max(accs) == a else f"{100*a:.2f}–{100*max(accs):.2f} %"
    print(f"| {rule} | {byz} | {rounds} | {spread} | {diff} | {r['wall_seconds']:.0f} | {r['all_final_digests_equal']} |")
PY
