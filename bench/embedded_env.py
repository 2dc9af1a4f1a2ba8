"""The embedded default's Airflow environment (scripts/embedded.py), reused by the benchmarks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("seamless_embedded", ROOT / "scripts" / "embedded.py")
embedded = importlib.util.module_from_spec(_spec)
assert _spec.loader is not None
_spec.loader.exec_module(embedded)
wait_healthy = embedded.wait_healthy
free_port = embedded.free_port


def environment(work: Path, port: int, dags: Path | None = None, *, project: Path | None = None,
                parallelism: int | None = None) -> dict[str, str]:
    """scripts/embedded.py's environment (AIRFLOW_HOME = work/airflow), optionally another DAGs folder."""
    env = embedded.environment(work, port, project or ROOT / "dags" / "seamless_project.example.yaml")
    if dags is not None:
        env["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
    if parallelism is not None:
        env["AIRFLOW__CORE__PARALLELISM"] = str(parallelism)
    return env
