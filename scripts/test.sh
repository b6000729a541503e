#!/usr/bin/env bash
# The whole test suite: fetches the real models the tests need (cached in ./models) and the
# official `openai` Python client the server tests drive (into target/pydeps), then runs every
# test in release mode (the model tests are heavy; one build profile keeps CI lean).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/fetch-models.sh all
py=$root/target/pydeps
if ! PYTHONPATH=$py python3 -c "import openai" 2>/dev/null; then
  echo "installing the openai Python client into $py ..." >&2
  python3 -m pip install -q --disable-pip-version-check --target "$py" openai
fi
export PYTHONPATH=$py${PYTHONPATH:+:$PYTHONPATH}
export PIO_TEST_PYTHON=${PIO_TEST_PYTHON:-python3}
cargo test --workspace --release --locked
