#!/usr/bin/env bash
# Benchmark: gradient time per round with the local executor against the
# function tier (local function host + local S3, the real Lambda and S3
# protocols) at concurrency 1, 2 and 4; the per-task overhead split into
# invoke, S3 fetch, S3 write and (de)serialisation, before and after the data
# plane's fixes (P2PML_S3_LEGACY_DATA_PLANE=1 restores the old client and
# server: SDK checksums, signed payloads, s3s-fs's 4 KiB reads and MD5 per put),
# against the targets (overhead <= 25 % of compute at one batch per task,
# <= 10 % at four); and the cost table.
# One peer, cnn, 4 batches of 64 per round.
#   bench/serverless.sh [OUT_DIR] [extra node args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-out/serverless}; shift || true
mkdir -p "$out"
common=(--limit-train 4000 --limit-test 500 --val-size 200 --epochs 1 --batches-per-round 4 --device cpu --seed 1 "$@")
tn() { # name, fn concurrency, node args...
  local name=$1 c=$2; shift 2
  target/release/testnet run --peers 1 --threads-per-node 1 --fn-concurrency "$c" --force --out "$out/$name" -- \
    "${common[@]}" "$@" >/dev/null 2>"$out/$name.log"
}
target/release/testnet run --peers 1 --threads-per-node 1 --force --out "$out/local" -- "${common[@]}" >/dev/null 2>"$out/local.log"
# Before: the old data plane, one batch per task and four.
P2PML_S3_LEGACY_DATA_PLANE=1 tn before-c1 1 --executor lambda --max-concurrency 1 --batches-per-invocation 1
P2PML_S3_LEGACY_DATA_PLANE=1 tn before-k4 1 --executor lambda --max-concurrency 1 --batches-per-invocation 4
for c in 1 2 4; do
  tn "lambda-c$c" "$c" --executor lambda --max-concurrency "$c" --batches-per-invocation 1
done
# The same round as one task of 4 batches: the per-task costs spread over 4 batches.
tn lambda-k4 1 --executor lambda --max-concurrency 1 --batches-per-invocation 4
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def load(name):
    return json.load(open(f"{out}/{name}/report.json"))
def per_round(r):
    log = r["peer_reports"][0]["rounds_log"]
    # The first round pays for the cold starts and the data upload: report it apart.
    first = log[0]["stages"]["compute"] * 1000
    rest = [x["stages"]["compute"] * 1000 for x in log[1:]]
    return first, sum(rest) / max(1, len(rest)), len(log)
loc = load("local")
f, m, n = per_round(loc)
print(f"gradient time per round (4 batches of 64, cnn), {n} rounds")
print(f"{'executor':<22} {'first round ms':>15} {'mean ms (rest)':>15} {'vs local':>9}")
print(f"{'local (1 thread)':<22} {f:>15.1f} {m:>15.1f} {1.0:>9.2f}")
base = m
names = [("before c=1", "before-c1"), ("before c=1,k4", "before-k4"), ("c=1", "lambda-c1"), ("c=2", "lambda-c2"), ("c=4", "lambda-c4"), ("c=1,k4", "lambda-k4")]
rows = []
for c, name in names:
    r = load(name)
    f, m, _ = per_round(r)
    rows.append((c, r))
    print(f"{'lambda ' + c:<22} {f:>15.1f} {m:>15.1f} {m / base:>9.2f}")
print()
print("per gradient task (means over successful gradient invocations, ms; invoke: warm ones, cold ms: an environment's start; k4: one task of 4 batches)")
print(f"{'run':>14} {'tasks':>6} {'compute':>8} {'invoke':>8} {'s3 fetch':>9} {'s3 write':>9} {'serde':>7} {'overhead':>9} {'ovh/comp':>9} {'target':>7} {'cold':>5} {'cold ms':>8} {'cache hits':>10}")
for c, r in rows:
    t = r["peer_reports"][0]["function_tier"]
    k = max(1, t["grad_tasks_ok"])
    comp = t["fn_compute_ms"] / k
    # Warm invocations' overhead; a cold start (the environment starting) is apart.
    warm = max(1, k - t.get("cold_grad_tasks", 0))
    inv = t["invoke_overhead_ms"] / warm
    cold_ms = t.get("cold_start_ms", 0) / max(1, t.get("cold_grad_tasks", 0))
    fetch = t["fn_fetch_ms"] / k
    write = t["fn_write_ms"] / k
    serde = (t["fn_decode_ms"] + t["fn_encode_ms"]) / k
    ovh = inv + fetch + write + serde
    target = 10 if "k4" in c else 25
    ok = "met" if 100 * ovh / comp <= target else "NOT met"
    cold = r["function_tier"]["cold_starts"]
    print(f"{c:>14} {k:>6} {comp:>8.1f} {inv:>8.1f} {fetch:>9.1f} {write:>9.1f} {serde:>7.1f} {ovh:>9.1f} {100 * ovh / comp:>8.1f}% {'<=' + str(target) + '%':>7} {cold:>5} {cold_ms:>8.0f} {t['params_cache_hits']:>10}  {ok}")
print()
print("peer side per round (ms): parameter upload, output download + decode, reduce invocation")
for c, r in rows:
    p = r["peer_reports"][0]
    t = p["function_tier"]
    n = max(1, p["rounds"])
    red = t.get("reduce_rtt_ms", 0) / max(1, t["reduces"])
    print(f"{c}: upload {t['peer_upload_ms'] / n:.1f}, download {t['peer_download_ms'] / n:.1f}, decode {t['peer_decode_ms'] / n:.1f}, "
          f"reduce {red:.1f} (x{t['reduces']}); data upload {t['data_upload_seconds']:.2f} s ({t['batches_uploaded']} batches); "
          f"tasks {t['tasks_ok']} ok + {t['tasks_ok_after_retry']} after retry + {t['fallbacks']} local of {t['tasks_planned']}")
print()
print("cost per peer (USD): measured billing and the paper's formula")
print(f"{'run':<16} {'wall s':>8} {'requests':>9} {'GB-s':>8} {'lambda':>10} {'instance':>10} {'total':>10} {'paper':>10}")
for name, r in [("local", loc)] + [(c, r) for c, r in rows]:
    c = r["cost_table"][0]
    print(f"{name:<16} {c['wall_seconds']:>8.1f} {c['requests']:>9} {c['gb_seconds']:>8.2f} {c['lambda_usd']:>10.6f} {c['instance_usd']:>10.6f} {c['total_usd']:>10.6f} {c['paper_formula_usd']:>10.6f}")
PY
