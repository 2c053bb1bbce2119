#!/usr/bin/env bash
# Set everything up, then run the main job: the demo on the embedded digits data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/randfeat demo "$@"
