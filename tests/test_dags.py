"""The `seamless_align` DAG and its local twin operator.

The DAG is parsed by Airflow's own DagBag from a temporary project YAML (SEAMLESS_PROJECT); its source
need not exist: parsing validates the config and builds the plan, it opens no layer. The local twin
runs real `seamless` commands as child processes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/seamless-test-airflow-home")
pytest.importorskip("airflow.sdk", reason="needs the airflow extra (scripts/test.sh installs it)")

import numpy as np
import yaml
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from operators.local import PlanStepRef, SeamlessLocalOperator, executor, structure_key
from seamless_core.config import parse_config
from seamless_core.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
POOLS = {"default_pool", "seamless_gpu"}


def project(tmp_path: Path, stop: int, fuse: str | None = "none", **extra) -> Path:
    """A project YAML; `fuse: none` (a task per step: the plan's own structure) unless asked, None: the default."""
    data = {"source": "file:///nowhere/stack", "destination": str(tmp_path / "out"),
            "sections": {"start": 0, "stop": stop}, "blocks": {"size": 10}, **extra}
    if fuse is not None:
        data["fuse"] = fuse
    path = tmp_path / f"project_{stop}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def parse(monkeypatch, path: Path, executor_kind: str = "local") -> DagBag:
    monkeypatch.setenv("SEAMLESS_PROJECT", str(path))
    monkeypatch.setenv("SEAMLESS_EXECUTOR", executor_kind)
    return DagBag(dag_folder=str(DAGS), known_pools=POOLS)


def plan_of(path: Path):
    return build_plan(parse_config(yaml.safe_load(path.read_text())))


# --- (a) imports cleanly -------------------------------------------------------------------------
def test_dagbag_imports_without_errors_or_warnings(tmp_path, monkeypatch) -> None:
    bag = parse(monkeypatch, project(tmp_path, 25))
    assert bag.import_errors == {}
    assert bag.captured_warnings == {}
    assert bag.dag_warnings == set()  # known_pools: no task uses a pool that was not declared
    assert set(bag.dag_ids) == {"seamless_align", "seamless_align_blocks"}


def test_default_project_is_the_bundled_demo(monkeypatch) -> None:
    monkeypatch.delenv("SEAMLESS_PROJECT", raising=False)
    monkeypatch.setenv("SEAMLESS_EXECUTOR", "local")
    bag = DagBag(dag_folder=str(DAGS), known_pools=POOLS)
    assert bag.import_errors == {}
    dag = bag.dags["seamless_align"]
    assert dag.params["source"] == "file://" + str(ROOT / "work/demo/misaligned")
    assert dag.params["section_stop"] == 30


# --- (b) structure = the plan ----------------------------------------------------------------------
def test_every_step_is_a_task_with_the_plans_dependencies(tmp_path, monkeypatch) -> None:
    path = project(tmp_path, 25)
    dag = parse(monkeypatch, path).dags["seamless_align"]
    plan = plan_of(path)
    priorities = plan.priorities()
    assert set(dag.task_dict) == {s.id for s in plan.steps}
    for step in plan.steps:
        task = dag.task_dict[step.id]
        assert task.upstream_task_ids == set(step.deps), step.id
        assert task.task_display_name == step.label
        assert task.priority_weight == priorities[step.id] and task.weight_rule == "absolute"
        assert task.pool == ("seamless_gpu" if step.gpu else "default_pool")
        assert task.step == plan.argv(step)  # the very command line `seamless align` runs
        assert isinstance(task, SeamlessLocalOperator)
    label = dag.task_dict["z12.t1.compute_field"].task_display_name
    assert label.startswith("z=12 mip=") and label.endswith("compute_field t1"), label
    groups = set(dag.task_group.children)
    assert {"block_000", "block_001", "block_002", "stitch", "compose", "render", "quality"} <= groups
    assert dag.task_dict["z12.vote"].task_group.group_id == "block_001"
    assert dag.task_dict["b001.stitch"].task_group.group_id == "stitch"
    assert dag.task_dict["z12.cpc"].task_group.group_id == "quality"
    assert dag.params["section_stop"] == 25 and dag.params["k"] == 3
    assert not dag.task_dict["z12.vote"].params  # the form's Params live on the DAG only (see the DAG file)


def test_executor_setting_selects_the_pod_operator(tmp_path, monkeypatch) -> None:
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    from operators.pod import SeamlessPodOperator

    path = project(tmp_path, 12)
    bag = parse(monkeypatch, path, "kubernetes")
    assert bag.import_errors == {}
    dag = bag.dags["seamless_align"]
    plan = plan_of(path)
    for step in plan.steps:
        task = dag.task_dict[step.id]
        assert isinstance(task, SeamlessPodOperator)
        assert task.arguments == plan.argv(step) and task.pool_kind == ("gpu" if step.gpu else "cpu")
    monkeypatch.setenv("SEAMLESS_EXECUTOR", "nomad")
    with pytest.raises(ValueError, match="local, kubernetes"):
        executor()


def test_run_params_change_paths_but_not_structure(tmp_path) -> None:
    path = project(tmp_path, 25)
    base = parse_config(yaml.safe_load(path.read_text())).model_dump(mode="json")
    plan = build_plan(parse_config(base))
    ref = PlanStepRef(base, str(path), "z12.vote", structure_key(plan))
    assert ref.argv({}) == plan.argv(plan.by_id["z12.vote"])
    moved = ref.argv({"destination": str(tmp_path / "elsewhere"), "device": "cuda"})
    assert any(str(tmp_path / "elsewhere") in a for a in moved) and "cuda" in moved
    with pytest.raises(AirflowFailException, match="changed: sections"):
        ref.argv({"section_stop": 40})
    with pytest.raises(AirflowFailException, match="changed: vote"):
        ref.argv({"k": 5})
    with pytest.raises(AirflowFailException, match="k must be odd"):
        ref.argv({"k": 4})


# --- (c) parse time --------------------------------------------------------------------------------
def test_a_1000_section_project_parses_into_the_whole_plan(tmp_path, monkeypatch) -> None:
    """The 1,000-section DAG (default `fuse: pairs`) parses completely; its parse time is a benchmark
    (bench/dag_parse.py: about 1.5 s here for its 4,895 tasks, 2.2 s with `fuse: none`'s 8,692)."""
    path = project(tmp_path, 1000, fuse=None)
    bag = parse(monkeypatch, path)
    assert bag.import_errors == {}
    dag = bag.dags["seamless_align"]
    plan = plan_of(path)
    assert {t.task_id for t in dag.tasks} == {t.id for t in plan.tasks}
    assert sorted(s for t in plan.tasks for s in t.steps) == sorted(s.id for s in plan.steps)
    for task in plan.tasks:
        assert dag.task_dict[task.id].upstream_task_ids == set(task.deps), task.id
    assert 4_500 < len(dag.tasks) < 5_500 and len(plan.steps) > 8_000  # 5.2 tasks and 8.7 steps a section


# --- (d) the local twin, for real --------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg, *args) -> None:
        self.lines.append(msg % args if args else msg)

    warning = error = debug = exception = info


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(SeamlessLocalOperator, "log", property(lambda self: rec))
    return rec


def test_local_operator_runs_seamless_info_on_a_real_layer(tmp_path, recorder) -> None:
    from seamless_core.geometry import BBox
    from seamless_core.volumes import LayerKind, create_from_info, make_image_info

    info = make_image_info(dtype="uint8", resolution=(4, 4, 50), size=(64, 64, 2), chunk_xy=64, max_mip=1,
                           kind=LayerKind.IMAGE)
    layer = create_from_info(str(tmp_path / "img"), info, LayerKind.IMAGE)
    layer.write(BBox((0, 0, 0), (64, 64, 2)), np.full((2, 1, 64, 64), 7, np.uint8))
    SeamlessLocalOperator(task_id="info", step=["info", str(tmp_path / "img")], warm=False).execute({})
    running = next(i for i, line in enumerate(recorder.lines) if line.startswith("running: "))
    assert "-m seamless_core info" in recorder.lines[running]
    assert any('"type": "image"' in line for line in recorder.lines[running + 1:])  # the child's output, line by line


def test_bad_input_fails_without_retry(tmp_path, recorder) -> None:
    op = SeamlessLocalOperator(task_id="missing", step=["info", str(tmp_path / "nothere")])
    with pytest.raises(AirflowFailException, match=r"seamless info exited with code 3 \(bad input\): .*no layer"):
        op.execute({})


class Scripted(SeamlessLocalOperator):
    """The operator's real process handling, with a tiny Python script instead of `seamless` (so no
    warm step server: tests/test_warm.py runs real steps through one)."""

    def __init__(self, **kwargs):
        super().__init__(warm=False, **kwargs)

    def command(self, argv):
        return [sys.executable, "-c", argv[-1]]


def test_storage_error_is_a_retryable_failure(recorder) -> None:
    op = Scripted(task_id="storage", step=["--marker", "m", "copy", "import sys; print('read 3 chunks'); sys.exit(4)"])
    with pytest.raises(AirflowException, match=r"seamless copy exited with code 4 \(storage") as info:
        op.execute({})
    assert not isinstance(info.value, AirflowFailException)
    assert "read 3 chunks" in recorder.lines


def test_on_kill_stops_the_child(recorder) -> None:
    op = Scripted(task_id="slow", step=["render", "import time; print('started', flush=True); time.sleep(60)"])
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(op, errors))
    thread.start()
    deadline = time.monotonic() + 10
    while "started" not in recorder.lines and time.monotonic() < deadline:
        time.sleep(0.05)
    op.on_kill()
    thread.join(10)
    assert not thread.is_alive()
    assert errors and "exited with code -15" in str(errors[0])


def _capture(op, errors) -> None:
    try:
        op.execute({})
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)


def test_step_must_be_an_argument_list() -> None:
    with pytest.raises(TypeError, match="never a shell string"):
        SeamlessLocalOperator(task_id="bad", step="info /data")  # type: ignore[arg-type]
