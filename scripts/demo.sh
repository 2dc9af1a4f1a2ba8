#!/usr/bin/env bash
# README.md's main command, the embedded default: sets up .venv (worker + Airflow), builds the demo volume
# from the shared ssTEM sample (ingest -> misalign with known fields, on file://), starts `airflow
# standalone` (SQLite, LocalExecutor, AIRFLOW_HOME under the working folder) with the seamless_align DAG
# and its local twin, triggers one alignment run, waits for it and prints the UI address, where the
# password is, and the Neuroglancer link. Airflow keeps running until Ctrl-C.
# SEAMLESS_DEMO=local runs the same workflow with the local executor instead (`seamless demo`, no Airflow).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${SEAMLESS_WORK:-work}"
SAMPLE="${SEAMLESS_SAMPLE:-../shared/data/isbi2012}"
if [ "${SEAMLESS_DEMO:-airflow}" = local ]; then
  bash scripts/setup.sh worker
  exec .venv/bin/seamless demo --data "$SAMPLE" --out "$WORK/demo" "$@"
fi
bash scripts/setup.sh worker,airflow
.venv/bin/seamless demo --data "$SAMPLE" --out "$WORK/demo" --no-align
exec .venv/bin/python scripts/embedded.py --work "$WORK" "$@"
