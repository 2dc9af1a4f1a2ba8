"""End to end through Airflow: `airflow dags test` of seamless_align with the local twin, on real layers.

A real Airflow (SQLite metadata DB migrated by the test, the DAG file parsed by Airflow, every task run
by Airflow's task runner as a `python -m seamless_core` child) must produce the same aligned image as
`seamless align` on the same project: the DAG is only a different way to run the same plan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from seamless_core.cli import main
from seamless_core.errors import ExitCode
from seamless_core.geometry import BBox
from seamless_core.volumes import LayerKind, open_layer

from workflow_helpers import deformed_stack

ROOT = Path(__file__).resolve().parents[1]
SIZE, SECTIONS = 256, 4
PROJECT = """\
source: {source}
destination: {destination}
sections: {{start: 0, stop: {stop}}}
stages: serial
blocks: {{size: 2, decay_dist: 100}}
cpc: {{mip: 1, patch: 16}}
"""


def test_airflow_dags_test_gives_the_image_of_seamless_align(tmp_path: Path) -> None:
    stack = deformed_stack(tmp_path, [0] * SECTIONS, SIZE, max_translation=6.0, cracked=(), debris=())
    local = tmp_path / "local.yaml"
    local.write_text(PROJECT.format(source=stack.path, destination=tmp_path / "local", stop=SECTIONS))
    assert main(["align", str(local), "--workers", "2", "--no-report"]) == ExitCode.OK

    project = tmp_path / "airflow.yaml"
    project.write_text(PROJECT.format(source=stack.path, destination=tmp_path / "airflow", stop=SECTIONS))
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "SEAMLESS_PROJECT": str(project), "SEAMLESS_EXECUTOR": "local",
           "PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}

    def airflow(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)

    assert airflow("db", "migrate").returncode == 0
    assert airflow("pools", "set", "seamless_gpu", "2", "GPU steps").returncode == 0
    result = airflow("dags", "test", "seamless_align")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    markers = sorted(p.stem for p in (tmp_path / "airflow" / ".seamless" / "steps").glob("*.json"))
    assert markers == sorted(p.stem for p in (tmp_path / "local" / ".seamless" / "steps").glob("*.json"))
    region = BBox((0, 0, 0), (SIZE, SIZE, SECTIONS))
    via_airflow = open_layer(str(tmp_path / "airflow" / "image"), LayerKind.IMAGE).read(region)
    via_align = open_layer(str(tmp_path / "local" / "image"), LayerKind.IMAGE).read(region)
    assert np.array_equal(via_airflow, via_align)
    # each task's log tells the step's story (`dags test` prints task logs): progress lines and figures
    output = result.stdout + result.stderr
    assert "compute_field z=3->2: done" in output and "render: done" in output and '"mpx_per_s"' in output
    report = json.loads((tmp_path / "airflow" / ".seamless" / "steps" / "z3.render.json").read_text())["report"]
    assert report["step"] == "render" and report["chunks"] > 0
    # the task's figures are its XCom (operators.figures): the same report its restart marker keeps
    import sqlite3

    with sqlite3.connect(tmp_path / "home" / "airflow.db") as db:
        rows = dict(db.execute("SELECT task_id, value FROM xcom WHERE dag_id = 'seamless_align' "
                               "AND key = 'return_value'").fetchall())
    steps = {s["step"]: s for t in rows if t.startswith("z3.") for s in json.loads(rows[t])["steps"]}  # fused or not
    assert "render" in steps, sorted(rows)
    assert steps["render"]["chunks"] == report["chunks"] and steps["render"]["megapixels"] == report["megapixels"]
