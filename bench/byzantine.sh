#!/usr/bin/env bash
# Byzantine-robustness experiment: 8 peers (cnn, Fashion-MNIST, 16k samples,
# 4 epochs, one batch per round), peer 3 byzantine sending -10 times its
# gradient (sign-flip:10), under each aggregation rule; and each rule without
# the attacker. Prints one table of final test accuracies (docs/byzantine.md).
#   bench/byzantine.sh [OUT_DIR] [extra node args]
# Runs already in OUT_DIR (a report.json) are kept; delete OUT_DIR to redo them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-out/byzantine}; shift || true
mkdir -p "$out"
args=(--data-dir /usr/share/datasets/fashion-mnist --limit-train 16000 --limit-test 2000 --val-size 1000
      --epochs 4 --batches-per-round 1 --device cpu --failure-timeout-ms 8000 "$@")
run() { # NAME RULE [testnet args...]
  local name=$1 rule=$2; shift 2
  if [ -f "$out/$name/report.json" ]; then echo "== $name: kept from an earlier run"; return; fi
  echo "== $name: testnet run --peers 8 $* -- ${args[*]} --aggregation $rule"
  target/release/testnet run --peers 8 --force --out "$out/$name" "$@" -- "${args[@]}" --aggregation "$rule" \
    2>"$out/$name.log" || echo "   (testnet exited non-zero; see $out/$name.log)"
}
rules=(mean median trimmed-mean:0.125 krum:1)
for rule in "${rules[@]}"; do run "clean-${rule%%:*}" "$rule"; done
for rule in "${rules[@]}"; do run "byz-${rule%%:*}" "$rule" --byzantine 3:sign-flip:10; done
python3 - "$out" "${rules[@]}" <<'PY'
import json, os, re, sys
out, rules = sys.argv[1], sys.argv[2:]
def load(name):
    p = f"{out}/{name}/report.json"
    return json.load(open(p)) if os.path.exists(p) else None
def final(r):
    """(accuracy of the worst honest peer, best, rounds) or a failure note."""
    hs = [p for p in r["peer_reports"] if p.get("index") != 3] if r else []
    if not hs:
        probs = " ".join(r["problems"]) if r else "no report"
        m = re.search(r"round (\d+): cannot encode the gradient \(([^)]*)\)", probs)
        return None, f"diverged at round {m.group(1)} ({m.group(2)}): every peer stopped" if m else probs[:120]
    accs = [p["final_test_accuracy"] for p in hs]
    return (min(accs), max(accs), max(p["rounds"] for p in hs), r), None
ref = final(load("clean-mean"))[0]
print("| aggregation | clean: accuracy | peer 3 sign-flip:10: accuracy (honest peers) | vs clean mean | vs clean, same rule | digests equal | wall s |")
print("|---|---|---|---|---|---|---|")
for rule in rules:
    key = rule.split(":")[0]
    c, cnote = final(load(f"clean-{key}"))
    b, bnote = final(load(f"byz-{key}"))
    cs = f"{100*c[0]:.2f} %" if c else cnote
    if b:
        bs = f"{100*b[0]:.2f} %" if b[0] == b[1] else f"{100*b[0]:.2f}–{100*b[1]:.2f} %"
        vs_ref = f"{100*(b[0]-ref[0]):+.2f} pp" if ref else "-"
        vs_same = f"{100*(b[0]-c[0]):+.2f} pp" if c else "-"
        eq, wall = b[3]["all_final_digests_equal"], f"{b[3]['wall_seconds']:.0f}"
    else:
        bs, vs_ref, vs_same, eq, wall = bnote, "-", "-", "-", "-"
    print(f"| {rule} | {cs} | {bs} | {vs_ref} | {vs_same} | {eq} | {wall} |")
PY
