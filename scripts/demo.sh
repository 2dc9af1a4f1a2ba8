#!/usr/bin/env bash
# README.md's main command: sets up .venv and runs the local demo on the shared ssTEM sample:
# ingest -> misalign with known fields (render) -> downsample -> CPC, all as precomputed layers on file://.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh worker
exec .venv/bin/seamless demo --data "${SEAMLESS_SAMPLE:-../shared/data/isbi2012}" --out "${SEAMLESS_WORK:-work/demo}" "$@"
