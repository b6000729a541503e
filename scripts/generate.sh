#!/usr/bin/env bash
# The main job on a fresh machine: fetch the default model (SmolLM2-135M-Instruct) if it is
# missing, build pio, and chat-generate a reply to PROMPT.
# Usage: scripts/generate.sh ["PROMPT"] [more pio generate options...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
prompt=${1:-"Write a short story about a robot who learns to paint."}
shift || true
"$root/scripts/fetch-models.sh" smollm2
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p pio-cli
model=${PIO_MODELS_DIR:-$root/models}/SmolLM2-135M-Instruct.Q4_1.gguf
exec "$root/target/release/pio" generate --model "$model" --chat --prompt "$prompt" --max-tokens 200 "$@"
