#!/usr/bin/env bash
# Alternated decode runs of several pio variants, grouped by the memory bandwidth each run's own
# probe read: on a shared host the bandwidth can change for minutes at a time, and medians
# taken over both states compare runs that met different machines.
#
# Usage: scripts/bench-ab.sh [--rounds N] [--gen N] [--threads N] [--split GBPS] MODEL VARIANT...
#   A VARIANT is a space-separated list of VAR=value settings for `env`; PIO=path picks the pio
#   binary (default target/release/pio). Example, the same binary at two levels and an older
#   build:
#     scripts/bench-ab.sh --rounds 10 q.gguf "PIO_SIMD=avx512" "PIO_SIMD=avx2" "PIO=/tmp/old/pio"
# Prints each variant's median decode tokens/s below and above the split (default 65 GB/s),
# with the count of runs in each.
set -euo pipefail

rounds=8 gen=64 threads=2 split=65
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --gen) gen="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --split) split="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; exit 1 ;;
        *) break ;;
    esac
done
if [[ $# -lt 2 ]]; then
    echo "usage: $0 [--rounds N] [--gen N] [--threads N] [--split GBPS] MODEL VARIANT..." >&2
    exit 2
fi
model="$1"; shift
root="$(cd "$(dirname "$0")/.." && pwd)"
# The default binary is this checkout's, built as `scripts/bench-vs-llamacpp.sh` builds it.
cargo build --release --locked -p pio-cli --manifest-path "$root/Cargo.toml" >&2
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

for ((r = 1; r <= rounds; r++)); do
    for v in "$@"; do
        pio="$root/target/release/pio"
        settings=()
        for kv in $v; do
            case "$kv" in
                PIO=*) pio="${kv#PIO=}" ;;
                *) settings+=("$kv") ;;
            esac
        done
        line=$(env "${settings[@]}" "$pio" bench --model "$model" --threads "$threads" --prompt-tokens 16 \
            --gen-tokens "$gen" --json 2>/dev/null | tail -1)
        echo "$v|$line" >> "$log"
        echo "round $r/$rounds: $v done" >&2
    done
done

python3 - "$log" "$split" <<'PY'
import json, statistics, sys
split = float(sys.argv[2])
runs = {}
for line in open(sys.argv[1]):
    variant, _, js = line.rstrip("\n").partition("|")
    d = json.loads(js)
    runs.setdefault(variant, []).append((d["decode_tokens_per_s"], d["mem_bandwidth_bytes_per_s"] / 1e9))
def med(xs):
    return f"{statistics.median(xs):7.1f} (n={len(xs)})" if xs else "      - (n=0)"
print(f"{'variant':40s} {'below ' + str(split) + ' GB/s':>16s} {'above':>16s}")
for variant, rs in runs.items():
    lo = [t for t, bw in rs if bw < split]
    hi = [t for t, bw in rs if bw >= split]
    print(f"{variant:40s} {med(lo):>16s} {med(hi):>16s}")
PY
