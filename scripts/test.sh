#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), lint (ruff), then run the test suite with the 15 slowest tests
# listed. Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
echo "lint: ruff check ."
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q --durations=15 tests "$@"
