#!/usr/bin/env bash
# Creates .venv beside the checkout and installs the project with pinned versions.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh worker,test
# Why a script: README.md, .ci/run and the Dockerfiles all install through the same pins
# (constraints.txt), so what CI tests is what users and images get.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-worker}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
# torch is pinned to the CPU 2.13.0 build in constraints.txt: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --constraint constraints.txt --editable ".[${extras}]"
