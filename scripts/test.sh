#!/usr/bin/env bash
# The whole test suite: fetches the real models the tests need (cached in ./models), then runs
# every test in release mode (the model tests are heavy; one build profile keeps CI lean).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/fetch-models.sh all
cargo test --workspace --release --locked
