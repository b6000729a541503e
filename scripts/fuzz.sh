#!/usr/bin/env bash
# Fuzzes every target of crates/pio-fuzz (or those named) for SECONDS each (default 60), one
# after another, and prints per target its executions, corpus and coverage, and any crash.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]        (pio-fuzz list: the targets)
#
# With nightly Rust and cargo-fuzz (`cargo install cargo-fuzz`): coverage-guided libFuzzer over
# the crate in fuzz/ (AddressSanitizer, debug assertions on); corpora grow in fuzz/corpus/<target>/
# (seeded from the repository's test data by `pio-fuzz seed`), crashes land in
# fuzz/artifacts/<target>/. Otherwise: the stable mutational driver (`pio-fuzz run`), as CI runs
# it. Reproduce a crash with `target/release/pio-fuzz replay TARGET FILE` and keep the input in
# crates/pio-fuzz/regressions/<target>/ beside a test of the fix.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-60}
shift || true
cargo build --release --locked -q -p pio-fuzz
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(target/release/pio-fuzz list | awk '{print $1}')
fi
failed=0
if cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "libFuzzer (cargo +nightly fuzz), ${secs} s per target" >&2
  (cd fuzz && cargo +nightly fuzz build -O 2>&1 | tail -1) >&2
  for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    if [ ! -d "$corpus" ] || [ -z "$(ls -A "$corpus" 2>/dev/null)" ]; then
      target/release/pio-fuzz seed fuzz/corpus "$t" >/dev/null
      mv "fuzz/corpus/$t" "fuzz/corpus/$t.seed" && mkdir -p "$corpus" && cp "fuzz/corpus/$t.seed"/* "$corpus"/ && rm -r "fuzz/corpus/$t.seed"
    fi
    log=fuzz/artifacts/$t.log
    mkdir -p "fuzz/artifacts/$t"
    set +e
    (cd fuzz && cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=1048576 \
      -rss_limit_mb=8192 -timeout=60 -print_final_stats=1 >"artifacts/$t.log" 2>&1)
    rc=$?
    set -e
    rm -rf /dev/shm/pio-fuzz-* 2>/dev/null || true
    stats=$(grep -E '^#[0-9]+.*(DONE|cov:)' "$log" | tail -1 || true)
    execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)
    crashes=$(ls "fuzz/artifacts/$t" 2>/dev/null | grep -c -E '^(crash|leak|timeout|oom)-' || true)
    echo "$t: rc $rc, executions ${execs:-?}, corpus $(ls "$corpus" | wc -l) files, last status: ${stats:-none}, artifacts: $crashes"
    [ "$rc" -eq 0 ] || failed=1
  done
else
  echo "no nightly cargo-fuzz: the stable mutational driver, ${secs} s per target" >&2
  for t in "${targets[@]}"; do
    target/release/pio-fuzz run "$t" "$secs" || failed=1
  done
fi
exit $failed
