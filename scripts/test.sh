#!/usr/bin/env bash
# The whole test suite: fetches the real models the tests need (cached in ./models) and the
# official `openai` Python client the server tests drive, pytest and maturin (into target/pydeps),
# then runs every test in release mode (the model tests are heavy; one build profile keeps CI
# lean), and the Python package's tests on its freshly built wheel.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/fetch-models.sh all
py=$root/target/pydeps
if ! PYTHONPATH=$py python3 -c "import openai, pytest, maturin" 2>/dev/null; then
  echo "installing the openai Python client, pytest and maturin into $py ..." >&2
  python3 -m pip install -q --disable-pip-version-check --target "$py" openai pytest 'maturin>=1.5,<2'
fi
export PYTHONPATH=$py${PYTHONPATH:+:$PYTHONPATH}
export PIO_TEST_PYTHON=${PIO_TEST_PYTHON:-python3}
cargo test --workspace --release --locked
# The Python package: its wheel built (reusing the release build above) and installed beside
# the test dependencies, then its tests.
rm -rf target/wheels
"$py/bin/maturin" build --release --locked -m crates/pio-python/Cargo.toml -o target/wheels
python3 -m pip install -q --disable-pip-version-check --no-deps --force-reinstall --upgrade --target "$py" target/wheels/inference_pio-*.whl
python3 -m pytest -q crates/pio-python/tests
