#!/usr/bin/env bash
# Sets up (scripts/setup.sh), checks format and lint (ruff format --check, ruff check: the rules in
# pyproject.toml) and runs the whole test suite, slow tests included. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m ruff format --check .
python -m ruff check .
python -m pytest "$@"
