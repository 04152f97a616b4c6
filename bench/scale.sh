#!/usr/bin/env bash
# Scale: peers x exchange (all-to-all, sharded) x link (loopback, emulated
# bw=100mbit,delay=25ms) on this machine. cnn, QSGD 4-bit, batch 64, one batch
# per round, 60 rounds per run (the data cut so that every peer has 60
# batches: 60 x 64 x peers samples), testnet --ideal for the efficiency
# against one process on every core. Prints a table of round time, exchange
# latency, bytes per peer per round, efficiency, peak RSS and the test
# accuracy; writes docs/scale.md's table and docs/scale.svg.
#   bench/scale.sh [OUT_DIR]
#   PEERS="4 8 16 32" EXCHANGES="all-to-all sharded" LINKS="loopback wan" bench/scale.sh
# Runs already in OUT_DIR (a report.json) are kept; delete OUT_DIR to redo them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-out/scale}
mkdir -p "$out"
PEERS=${PEERS:-"4 8 16 32"}
EXCHANGES=${EXCHANGES:-"all-to-all sharded"}
LINKS=${LINKS:-"loopback wan"}
for n in $PEERS; do
  for x in $EXCHANGES; do
    for l in $LINKS; do
      name="p$n-$x-$l"
      if [ -f "$out/$name/report.json" ]; then echo "== $name: kept from an earlier run"; continue; fi
      link=(); [ "$l" = wan ] && link=(--link bw=100mbit,delay=25ms)
      train=$((60 * 64 * n + 1000))
      echo "== $name"
      target/release/testnet run --peers "$n" --force --ideal --timeout 3600 --out "$out/$name" "${link[@]}" -- \
        --data-dir /usr/share/datasets/fashion-mnist --limit-train "$train" --val-size 1000 --limit-test 2000 \
        --epochs 1 --batches-per-round 1 --device cpu --model cnn --compression qsgd:bits=4,bucket=512 \
        --exchange "$x" --failure-timeout-ms 20000 --seed 1 \
        >"$out/$name.out" 2>"$out/$name.log" || echo "   (testnet exited non-zero; see $out/$name.log)"
    done
  done
done
python3 - "$out" <<'PY'
import json, os, sys, glob, re
out = sys.argv[1]
rows = []
for p in sorted(glob.glob(f"{out}/*/report.json")):
    name = os.path.basename(os.path.dirname(p))
    m = re.match(r"p(\d+)-(all-to-all|sharded)-(\w+)", name)
    if not m: continue
    r = json.load(open(p)); s = r.get("scale", {})
    eff = s.get("efficiency")
    acc = r["accuracy_by_epoch"][-1] if r["accuracy_by_epoch"] else float("nan")
    rows.append((int(m[1]), m[2], m[3], s.get("round_ms_median", 0), s.get("exchange_ms_median", 0),
                 s.get("bytes_sent_per_peer_round", 0) / 1e3, s.get("bytes_received_per_peer_round", 0) / 1e3,
                 eff * 100 if eff else float("nan"), s.get("peak_rss_mb_max") or float("nan"), acc * 100,
                 r["rounds_with_equal_digests"] == r["common_rounds"] and r["ok"]))
rows.sort()
hdr = "| peers | exchange | link | round ms | exchange ms | KB sent/peer/round | KB received/peer/round | efficiency % | peak RSS MB | test acc % | equal digests, ok |"
print(hdr); print("|" + "---|" * 11)
for r in rows:
    print("| %d | %s | %s | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.1f | %s |" % r)
# The plot: round time against peers, one line per (exchange, link); a plain SVG.
series = {}
for r in rows: series.setdefault((r[1], r[2]), []).append((r[0], r[3]))
if series:
    W, H, L, B = 640, 400, 60, 40
    xs = sorted({r[0] for r in rows}); ymax = max(r[3] for r in rows) * 1.1 or 1
    X = lambda n: L + (xs.index(n) / max(1, len(xs) - 1)) * (W - L - 20)
    Y = lambda v: H - B - v / ymax * (H - B - 20)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="black"/><line x1="{L}" y1="20" x2="{L}" y2="{H-B}" stroke="black"/>',
           f'<text x="{W/2}" y="{H-8}" text-anchor="middle">peers</text>',
           f'<text x="14" y="{H/2}" transform="rotate(-90 14 {H/2})" text-anchor="middle">round time (ms)</text>']
    for n in xs: svg.append(f'<text x="{X(n)}" y="{H-B+16}" text-anchor="middle">{n}</text>')
    for k in range(5):
        v = ymax * k / 4; svg.append(f'<text x="{L-6}" y="{Y(v)+4}" text-anchor="end">{v:.0f}</text>')
    for i, ((x, l), pts) in enumerate(sorted(series.items())):
        c = colors[i % 4]; pts.sort()
        svg.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>' % (c, " ".join(f"{X(n)},{Y(v)}" for n, v in pts)))
        svg.append(f'<text x="{L+10}" y="{30+16*i}" fill="{c}">{x}, {l}</text>')
    svg.append("</svg>")
    open("docs/scale.svg", "w").write("\n".join(svg))
    print("wrote docs/scale.svg")
PY
