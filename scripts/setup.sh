#!/usr/bin/env bash
# Create (or reuse) the local virtual environment .venv and install randfeat with every extra.
# Works on a fresh machine with Python >= 3.10 and pip. torch is pinned to the release this project
# is tested with; pip takes it from a local wheel cache where one is configured.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# KaTeX, which renders the docs' math, comes from npm (package.json / package-lock.json pin it);
# the docs build copies it into the site, so a page needs no network. Everything else works without npm.
if ! command -v npm >/dev/null 2>&1; then
  echo "[setup] npm not found: the docs site needs KaTeX from npm (install Node.js >= 18 and npm)" >&2
elif [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "[setup] installing the docs' KaTeX into node_modules (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
fi
STAMP="$VENV/.randfeat-setup"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
echo "[setup] installing torch and randfeat[dev] into $VENV (first time: a few minutes)"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
# torchattacks (white-box tests, attack benchmarks) pins requests~=2.25.1 but never imports requests;
# its real dependencies (torch, torchvision, scipy, tqdm, numpy) are installed above.
"$VENV/bin/python" -m pip install -q --no-deps "torchattacks==3.5.1"
touch "$STAMP"
