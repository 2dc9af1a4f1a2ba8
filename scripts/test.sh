#!/usr/bin/env bash
# README.md's test command: sets up .venv with the test extras and runs the whole suite.
# .ci/run calls exactly this script on a clean clone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh worker,airflow,test,browser  # browser: Debian chromium for tests/test_browser.py
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
