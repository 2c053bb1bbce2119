#!/usr/bin/env bash
# Set everything up, then run the tests (2 worker processes).
#   bash scripts/test.sh           the whole suite (what .ci/run runs)
#   bash scripts/test.sh --fast    the fast tier for the edit-test loop: no test marked slow, so no
#                                  server or other process, docs build, browser or model training
#                                  (tests/conftest.py marks them); under a minute on 2 cores
# Any other argument goes to pytest: bash scripts/test.sh --fast tests/eval -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one torch thread per worker: two workers on two cores, no oversubscription
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -n "${RANDFEAT_TEST_WORKERS:-2}" "$@"
