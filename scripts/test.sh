#!/usr/bin/env bash
# Set everything up, then run the whole test suite (2 worker processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one torch thread per worker: two workers on two cores, no oversubscription
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -n "${RANDFEAT_TEST_WORKERS:-2}" "$@"
