#!/usr/bin/env bash
# Side-by-side speed of pio, llama.cpp and ik_llama.cpp on the same GGUF files, interleaved
# run by run so a noisy machine hurts every engine alike; prints medians and ratios.
#
# Every run is bracketed by `pio bandwidth` probes: on a shared host the memory bandwidth left to
# us can change by half for minutes at a time, so beside the plain medians the summary gives
# each engine's decode as a fraction of the bandwidth its own runs met (weight bytes per token x
# tokens/s over the mean of the probes before and after), and pio's decode ratio to the best
# peer within each state of the machine: over the steady runs (two probes within 15% of each
# other) whose bandwidth was below --split GB/s (default 65), and over those above it.
#
#   scripts/bench-vs-llamacpp.sh [--runs N] [--prompt P] [--gen G] [--threads T] [--split GBPS] FILE.gguf...
#
# Peers: LLAMA_CPP_BIN and IK_LLAMA_CPP_BIN name the build/bin directories holding llama-bench
# (build them with ../shared/tools/build-llamacpp.sh DIR [SOURCE]); an engine whose directory is
# unset or missing is left out. Raw results go to bench-results/<time>.jsonl.
set -euo pipefail

runs=5 prompt=512 gen=128 threads=2 split=65
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --prompt) prompt="$2"; shift 2 ;;
        --gen) gen="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --split) split="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; exit 1 ;;
        *) break ;;
    esac
done
if [[ $# -eq 0 ]]; then
    echo "error: name at least one GGUF file" >&2
    exit 1
fi

root="$(cd "$(dirname "$0")/.." && pwd)"
cargo build --release --locked -p pio-cli --manifest-path "$root/Cargo.toml" >&2
pio="$root/target/release/pio"
mkdir -p "$root/bench-results"
out="$root/bench-results/$(date +%Y%m%d-%H%M%S).jsonl"

engines=(pio)
declare -A bin
for pair in "llama.cpp:${LLAMA_CPP_BIN:-}" "ik_llama.cpp:${IK_LLAMA_CPP_BIN:-}"; do
    name="${pair%%:*}" dir="${pair#*:}"
    if [[ -n "$dir" && -x "$dir/llama-bench" ]]; then
        engines+=("$name")
        bin[$name]="$dir"
    else
        echo "note: $name left out (set ${name//[.-]/_} bin dir: LLAMA_CPP_BIN / IK_LLAMA_CPP_BIN)" >&2
    fi
done

record() { # engine file run pp tg rss bw_before bw_after
    printf '{"engine":"%s","file":"%s","run":%s,"pp":%s,"tg":%s,"rss":%s,"bw_before":%s,"bw_after":%s}\n' "$@" >>"$out"
}
probe() {
    "$pio" --threads "$threads" bandwidth --json | jq -r .mem_bandwidth_bytes_per_s
}

for run in $(seq 1 "$runs"); do
    for file in "$@"; do
        for engine in "${engines[@]}"; do
            echo "run $run/$runs: $engine on $(basename "$file")" >&2
            bw_before=$(probe)
            if [[ $engine == pio ]]; then
                j=$("$pio" bench --model "$file" --threads "$threads" --prompt-tokens "$prompt" \
                    --gen-tokens "$gen" --repeats 1 --json)
                pp=$(jq -r .prefill_tokens_per_s <<<"$j")
                tg=$(jq -r .decode_tokens_per_s <<<"$j")
                rss=$(jq -r .peak_rss_bytes <<<"$j")
                jq -c '{file: .model, bandwidth: .mem_bandwidth_bytes_per_s, bytes_per_token: .weight_bytes_per_token}' \
                    <<<"$j" >>"$out.roofline"
            else
                dir="${bin[$engine]}"
                log=$(mktemp)
                LD_LIBRARY_PATH="$dir" /usr/bin/time -f '%M' -o "$log.rss" "$dir/llama-bench" -m "$file" \
                    -t "$threads" -p "$prompt" -n "$gen" -r 1 -o json >"$log" 2>/dev/null
                pp=$(jq -r '.[] | select(.n_gen == 0) | .avg_ts' "$log")
                tg=$(jq -r '.[] | select(.n_prompt == 0) | .avg_ts' "$log")
                rss=$(( $(tail -n 1 "$log.rss") * 1024 ))
                rm -f "$log" "$log.rss"
            fi
            record "$engine" "$file" "$run" "$pp" "$tg" "$rss" "$bw_before" "$(probe)"
        done
    done
done

python3 - "$out" "$split" <<'EOF'
import json, statistics, sys, collections, os
path, split = sys.argv[1], float(sys.argv[2]) * 1e9
rows = [json.loads(l) for l in open(path)]
roof = collections.defaultdict(list)
if os.path.exists(path + ".roofline"):
    for l in open(path + ".roofline"):
        r = json.loads(l)
        roof[r["file"]].append(r["bandwidth"] / r["bytes_per_token"])
by = collections.defaultdict(lambda: collections.defaultdict(list))
for r in rows:
    for k in ("pp", "tg", "rss"):
        by[(r["file"], r["engine"])][k].append(r[k])
# Decode per unit of the bandwidth each run met (the mean of its two probes): all runs, and the
# steady ones (probes within 15% of each other).
bpt = {}
if os.path.exists(path + ".roofline"):
    for l in open(path + ".roofline"):
        r = json.loads(l)
        bpt[r["file"]] = r["bytes_per_token"]
for r in rows:
    if "bw_before" in r and r["file"] in bpt:
        a, b = r["bw_before"], r["bw_after"]
        frac = r["tg"] * bpt[r["file"]] / ((a + b) / 2)
        d = by[(r["file"], r["engine"])]
        d["frac"].append(frac)
        if abs(a - b) <= 0.15 * max(a, b):
            d["steady"].append(frac)
            d["loaded" if (a + b) / 2 < split else "free"].append(r["tg"])
files = list(dict.fromkeys(r["file"] for r in rows))
engines = list(dict.fromkeys(r["engine"] for r in rows))
med = lambda xs: statistics.median(xs)
print(f"medians of {max(r['run'] for r in rows)} interleaved runs ({path})")
print(f"{'file':44} {'engine':13} {'prefill t/s':>11} {'decode t/s':>10} {'peak RSS MB':>11} {'decode / bandwidth met (steady runs)':>36}")
for f in files:
    for e in engines:
        d = by[(f, e)]
        if d["pp"]:
            bw = f"{med(d['frac']):.0%} ({med(d['steady']):.0%} of {len(d['steady'])})" if d["steady"] else (f"{med(d['frac']):.0%}" if d["frac"] else "")
            print(f"{os.path.basename(f):44} {e:13} {med(d['pp']):11.1f} {med(d['tg']):10.1f} {med(d['rss'])/1e6:11.0f} {bw:>36}")
    peers = [e for e in engines if e != "pio" and by[(f, e)]["pp"]]
    if peers and by[(f, "pio")]["pp"]:
        best_pp = max(med(by[(f, e)]["pp"]) for e in peers)
        best_tg = max(med(by[(f, e)]["tg"]) for e in peers)
        line = (f"{'':44} {'pio / best':13} {med(by[(f, 'pio')]['pp']) / best_pp:10.2f}x "
                f"{med(by[(f, 'pio')]['tg']) / best_tg:9.2f}x")
        if roof[f]:
            line += f"   decode at {med(by[(f, 'pio')]['tg']) / med(roof[f]):.0%} of the roofline ({med(roof[f]):.1f} t/s)"
        print(line)
        for state, sign in (("loaded", "<"), ("free", ">=")):
            tgs = [(med(by[(f, e)][state]), len(by[(f, e)][state])) for e in peers if by[(f, e)][state]]
            mine = by[(f, "pio")][state]
            if tgs and mine:
                best = max(tgs)
                print(f"{'':44} {state + ' state':13} {'':>11} {med(mine) / best[0]:9.2f}x"
                      f"   (steady runs {sign} {split / 1e9:.0f} GB/s: pio {med(mine):.1f} of {len(mine)},"
                      f" best peer {best[0]:.1f} of {best[1]})")
EOF
