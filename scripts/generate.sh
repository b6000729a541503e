#!/usr/bin/env bash
# The main job on a fresh machine: fetch the default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M,
# the better of the two real models: SmolLM2-135M-Instruct loops or drifts at either its card's
# sampling or the generic one) if it is missing, build pio, and chat-generate a reply to PROMPT
# with the model's recommended sampling, stopping at its end-of-turn token.
# Usage: scripts/generate.sh ["PROMPT"] [more pio generate options...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
prompt=${1:-"Write a short story about a robot who learns to paint."}
shift || true
"$root/scripts/fetch-models.sh" qwen2.5
cargo build --release --quiet --manifest-path "$root/Cargo.toml" -p pio-cli
model=${PIO_MODELS_DIR:-$root/models}/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
exec "$root/target/release/pio" generate --model "$model" --chat --prompt "$prompt" --max-tokens 200 "$@"
