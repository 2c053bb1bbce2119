#!/usr/bin/env bash
# Set everything up, then run the whole test suite (2 worker processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${RANDFEAT_TEST_WORKERS:-2}" "$@"
