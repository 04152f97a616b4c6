#!/usr/bin/env bash
# Fuzzes every decoder of untrusted input with cargo fuzz (libFuzzer, nightly):
#   scripts/fuzz.sh [RUNS] [TARGET...]
# RUNS defaults to 10,000,000 executions per target (each also stops after 30
# minutes); TARGET defaults to all of them. Corpora stay in fuzz/corpus/<target>,
# crashes in fuzz/artifacts/<target>; each target's last lines go to
# out/fuzz/<target>.log. Needs the nightly toolchain (rustup toolchain install
# nightly) and installs cargo-fuzz if it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs=${1:-10000000}; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gossip request_response qsgd blobs event)
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "scripts/fuzz.sh: cargo fuzz needs the nightly toolchain: rustup toolchain install nightly" >&2; exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p out/fuzz
(cd fuzz && cargo +nightly fuzz build -O)
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "== $t: $runs runs (at most 1800 s)"
  start=$(date +%s)
  if (cd fuzz && cargo +nightly fuzz run -O "$t" -- -runs="$runs" -max_total_time=1800 -max_len=8192 \
        -rss_limit_mb=4096 -print_final_stats=1) >"out/fuzz/$t.full.log" 2>&1; then status=ok; else status=CRASH; fi
  grep -E "^stat::|DONE|ERROR|panicked|SUMMARY" "out/fuzz/$t.full.log" | tail -12 > "out/fuzz/$t.log" || true
  echo "   $status in $(( $(date +%s) - start )) s: $(grep -E 'stat::number_of_executed_units' "out/fuzz/$t.log" | awk '{print $2}') executions"
  if [ "$status" != ok ]; then cat "out/fuzz/$t.log"; exit 1; fi
done
