"""The "Neuroglancer" extra link of both step operators, and the plugin that registers it.

The DAG is parsed by Airflow's DagBag (local twin and Kubernetes executors); the link is computed the
way Airflow 3's task runner does at the end of a try, `link.get_link(operator=task, ti_key=<runtime task
instance>)`, with a real RuntimeTaskInstance whose run overrides Params. The layers are on a bucket that
does not exist and on local paths that do not exist: the link is built from paths and numbers only. The
plugin is loaded by Airflow's own plugins manager in a fresh process, and the DAG is serialized and
deserialized there as the API server sees it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/seamless-test-airflow-home")
pytest.importorskip("airflow.sdk", reason="needs the airflow extra (scripts/test.sh installs it)")

import pendulum
import yaml
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.api.datamodels._generated import DagRun, TIRunContext
from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

from operators.links import NeuroglancerLink
from operators.local import SeamlessLocalOperator
from seamless_core.neuroglancer import VIEWER, link_state

ROOT = Path(__file__).resolve().parents[1]
BBOX = [1024, 2048, 5120, 4096]
PROJECT = {"source": "gs://lab/em", "destination": "gs://lab/aligned", "bbox": BBOX,
           "sections": {"start": 0, "stop": 14}, "blocks": {"size": 5}, "fuse": "none"}
POOLS = {"default_pool", "seamless_gpu"}


def parse(project: dict[str, Any], folder: Path, executor: str):
    path = folder / f"project_{executor}.yaml"
    path.write_text(yaml.safe_dump(project))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEAMLESS_PROJECT", str(path))
        mp.setenv("SEAMLESS_EXECUTOR", executor)
        mp.delenv("SEAMLESS_GPU_POOL", raising=False)
        bag = DagBag(dag_folder=str(ROOT / "dags" / "seamless_align.py"), known_pools=POOLS)
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["seamless_align"]


@pytest.fixture(scope="module")
def local_dag(tmp_path_factory):
    return parse(PROJECT, tmp_path_factory.mktemp("links"), "local")


@pytest.fixture(autouse=True)
def fresh_params(local_dag):
    """Airflow's process_params resolves a run's conf into the DAG's own Param objects: harmless where a
    process runs one task, but tests share the parsed DAG, so each test gets the parse-time Params back."""
    saved = copy.deepcopy(local_dag.params)
    yield
    local_dag.params = saved


def runtime_ti(dag, task, conf: dict[str, Any]) -> RuntimeTaskInstance:
    """What the task runner passes as `ti_key` at finalize: a real RuntimeTaskInstance (built without the
    API server's validation round trip) whose DagRun carries `conf`."""
    now = pendulum.now("UTC")
    run = DagRun(dag_id=dag.dag_id, run_id="manual__links", logical_date=None, data_interval_start=None,
                 data_interval_end=None, run_after=now, start_date=now, end_date=None, run_type="manual",
                 state="running", conf=conf, consumed_asset_events=[], partition_key=None)
    return RuntimeTaskInstance.model_construct(
        id=uuid.uuid4(), task_id=task.task_id, dag_id=dag.dag_id, run_id=run.run_id, try_number=1, map_index=-1,
        start_date=now, task=task, max_tries=task.retries, dag_version_id=uuid.uuid4(),
        _ti_context_from_server=TIRunContext(dag_run=run, max_tries=task.retries),
    )


def link_of(dag, task_id: str, conf: dict[str, Any]) -> str:
    task = dag.task_dict[task_id]
    (link,) = [ln for ln in task.operator_extra_links if ln.name == "Neuroglancer"]
    return link.get_link(operator=task, ti_key=runtime_ti(dag, task, conf))


def test_the_link_of_a_z12_task_opens_section_12_of_the_aligned_image_and_the_source(local_dag) -> None:
    url = link_of(local_dag, "z12.vote", {})
    assert url.startswith(VIEWER + "/#!")
    state = link_state(url)
    assert [(layer["name"], layer["type"], layer["source"]) for layer in state["layers"]] == [
        ("aligned", "image", "precomputed://gs://lab/aligned/image"),
        ("source", "image", "precomputed://gs://lab/em"),
    ]
    x, y, z = state["position"]
    assert (x, y) == ((BBOX[0] + BBOX[2]) / 2, (BBOX[1] + BBOX[3]) / 2)  # the bbox centre, MIP 0 voxels
    assert z == 12.5 and math.floor(z) == 12  # the centre of voxel 12: Neuroglancer shows section 12
    assert link_state(link_of(local_dag, "z3.cpc", {}))["position"][2] == 3.5  # each task its own z


def test_the_runs_params_choose_the_layers(local_dag) -> None:
    state = link_state(link_of(local_dag, "z12.render", {"destination": "gs://lab/rerun", "source": "s3://b/em"}))
    assert [layer["source"] for layer in state["layers"]] == [
        "precomputed://gs://lab/rerun/image", "precomputed://s3://b/em"]
    assert state["position"][2] == 12.5


def test_the_pod_operator_has_the_same_link(local_dag, tmp_path) -> None:
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    from operators.pod import SeamlessPodOperator

    pod_dag = parse(PROJECT, tmp_path, "kubernetes")
    assert isinstance(pod_dag.task_dict["z12.vote"], SeamlessPodOperator)
    conf = {"destination": "gs://lab/rerun"}
    assert link_of(pod_dag, "z12.vote", conf) == link_of(local_dag, "z12.vote", conf)


def test_local_layers_are_served_from_their_common_folder(tmp_path) -> None:
    root = tmp_path / "nowhere"  # nothing exists there: no storage is read to build the link
    dag = parse({**PROJECT, "source": str(root / "em"), "destination": str(root / "out")}, tmp_path, "local")
    state = link_state(link_of(dag, "z12.vote", {}))
    assert [layer["source"] for layer in state["layers"]] == [
        "precomputed://http://127.0.0.1:1337/out/image", "precomputed://http://127.0.0.1:1337/em"]
    assert not root.exists()


def test_without_a_bbox_the_viewer_keeps_its_default_position(tmp_path) -> None:
    dag = parse({k: v for k, v in PROJECT.items() if k != "bbox"}, tmp_path, "local")
    state = link_state(link_of(dag, "z12.vote", {}))
    assert "position" not in state  # Neuroglancer takes all three axes or none (see section_link)
    assert state["layers"][0]["source"] == "precomputed://gs://lab/aligned/image"


def test_a_bare_task_instance_key_uses_the_projects_values(local_dag) -> None:
    task = local_dag.task_dict["z12.vote"]
    key = type("Key", (), {"dag_id": "seamless_align", "task_id": "z12.vote", "run_id": "r", "map_index": -1})()
    state = link_state(NeuroglancerLink().get_link(task, ti_key=key))
    assert state["layers"][0]["source"] == "precomputed://gs://lab/aligned/image"


def test_an_operator_without_a_plan_has_no_link() -> None:
    op = SeamlessLocalOperator(task_id="bare", step=["info", "gs://lab/em"])
    assert NeuroglancerLink().get_link(op, ti_key=None) == ""


PLUGIN_CHECK = textwrap.dedent("""
    import json
    from airflow import plugins_manager
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    info = plugins_manager.get_plugin_info()
    errors = plugins_manager.get_import_errors()
    links = [(type(link).__module__, type(link).__name__) for link in plugins_manager.get_operator_extra_links()]
    dag = DagBag(dag_folder="dags/seamless_align.py", known_pools={"default_pool", "seamless_gpu"}).dags["seamless_align"]
    task = DagSerialization.from_dict(DagSerialization.to_dict(dag)).task_dict["z12.vote"]
    served = {name: [type(link).__name__, link.xcom_key] for name, link in task.operator_extra_link_dict.items()}
    print(json.dumps({"plugins": [p["name"] for p in info], "errors": errors, "links": links, "served": served}))
""")


def test_the_plugin_loads_in_airflows_plugins_manager(tmp_path) -> None:
    project = tmp_path / "project.yaml"
    project.write_text(yaml.safe_dump(PROJECT))
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "SEAMLESS_PROJECT": str(project), "SEAMLESS_EXECUTOR": "local"}
    result = subprocess.run([sys.executable, "-c", PLUGIN_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    ours = [name for name in report["errors"] if "seamless_links" in name]
    assert not ours, report["errors"]
    assert "seamless_links" in report["plugins"]
    assert ("operators.links", "NeuroglancerLink") in [tuple(link) for link in report["links"]]
    # the API server shows the URL the worker stored in XCom; the plugin does not replace it
    assert report["served"] == {"Neuroglancer": ["XComOperatorLink", "_link_NeuroglancerLink"]}
