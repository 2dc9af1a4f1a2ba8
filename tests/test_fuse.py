"""`fuse`: the plan's steps grouped into fewer tasks (fewer Airflow task and pod starts), same results.

A fused task is one `seamless` command line (its steps' own command lines joined by `--then`), so each
step keeps its restart marker. Checked here: the grouping covers every step once, keeps a valid order,
never chains blocks or final renders to each other; `--then` runs the steps in order and stops at the
first failure; a plan run task by task with `fuse: block` leaves the image and the markers of `seamless
align`; the DAG builds one Airflow task per plan task and refuses a run whose Params change `fuse`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from seamless_core.cli import THEN as CLI_THEN
from seamless_core.cli import main
from seamless_core.config import parse_config
from seamless_core.errors import ExitCode
from seamless_core.geometry import BBox
from seamless_core.plan import THEN, build_plan, topological
from seamless_core.volumes import LayerKind, open_layer

from workflow_helpers import deformed_stack


def config(**overrides):
    base = {"source": "file:///data/src", "destination": "file:///data/out", "sections": {"start": 0, "stop": 30},
            "blocks": {"size": 10, "decay_dist": 100}, "stages": "serial"}
    base.update(overrides)
    return parse_config(base)


@pytest.mark.parametrize("fuse", ["none", "pairs", "section", "block"])
@pytest.mark.parametrize("extra", [{}, {"bad_sections": [10, 13]}, {"sections": {"start": 0, "stop": 2}},
                                   {"granularity": "stage", "stages": "exact"}, {"blocks": {"size": 4, "decay_dist": 6}}])
def test_tasks_cover_every_step_once_in_a_valid_order(fuse, extra) -> None:
    plan = build_plan(config(fuse=fuse, **extra))
    owned = [s for t in plan.tasks for s in t.steps]
    assert sorted(owned) == sorted(s.id for s in plan.steps)
    task_of = {s: t.id for t in plan.tasks for s in t.steps}
    done: set[str] = set()
    for task in plan.tasks:  # tasks in order, steps in order inside: every step's deps already ran
        assert set(task.deps) <= {t.id for t in plan.tasks} and task.id not in task.deps
        assert all(d in done for d in task.deps)
        inside: set[str] = set()
        for step_id in task.steps:
            for dep in plan.by_id[step_id].deps:
                assert dep in inside or task_of[dep] in task.deps, (task.id, step_id, dep)
            inside.add(step_id)
        done.add(task.id)
    assert [t.id for t in topological(plan.tasks)]
    if fuse == "none":
        assert [t.id for t in plan.tasks] == [s.id for s in plan.steps]
        assert all(plan.task_argv(t) == plan.argv(plan.by_id[t.id]) for t in plan.tasks)
        assert plan.task_priorities() == plan.priorities()


def test_block_fusion_keeps_blocks_and_final_renders_parallel() -> None:
    plan = build_plan(config(fuse="block"))
    ids = [t.id for t in plan.tasks]
    assert ids == ["b000.chain", "b001.chain", "b002.chain", "b000.final", "b001.final", "b002.final",
                   "b001.cpc", "b002.cpc"]
    by_id = plan.task_by_id
    assert all(by_id[f"b{b:03d}.chain"].deps == () for b in range(3))  # blocks still run at once
    assert by_id["b002.final"].deps == ("b000.chain", "b001.chain", "b002.chain")  # stitches, its votes
    assert not any(d.endswith(".final") for b in range(3) for d in by_id[f"b{b:03d}.final"].deps)
    assert by_id["b001.cpc"].deps == ("b000.final", "b001.final")  # z=11 against z=10, rendered by block 0
    assert "b002.stitch" in by_id["b001.chain"].steps  # the stitch ends the chain that votes its section
    assert by_id["b001.chain"].gpu and not by_id["b001.cpc"].gpu
    argv = plan.task_argv(by_id["b000.final"])
    assert argv.count(THEN) == len(by_id["b000.final"].steps) - 1 and argv[0] == "--marker"
    assert CLI_THEN == THEN
    assert by_id["b001.final"].label.startswith("block 1 z=11-20 final: compose x10, render x10")


def test_section_fusion_two_tasks_per_section() -> None:
    plan = build_plan(config(fuse="section"))
    by_id = plan.task_by_id
    assert by_id["z13.chain"].steps == ("z13.t1.compute_field", "z13.t2.compute_field", "z13.t3.compute_field",
                                        "z13.vote", "b001.z13.render")
    assert set(by_id["z13.chain"].deps) == {"z12.chain", "z11.chain"}  # z11's chain began with the block's start
    assert by_id["z11.chain"].steps[0] == "b001.z10.start"
    assert by_id["z12.final"].steps == ("z12.compose", "z12.render", "z12.cpc_source")
    assert not any(d.endswith(".final") for d in by_id["z12.final"].deps)  # finals stay parallel
    assert {t.id for t in plan.tasks if t.kind == "cpc"} == {"b000.cpc", "b001.cpc", "b002.cpc"}
    assert len(plan.tasks) < len(plan.steps) / 3


def test_pair_fusion_joins_only_steps_that_run_back_to_back() -> None:
    """The default: nothing on a chain waits longer than with a task per step; 5.2 tasks a section, not 8.7."""
    plan = build_plan(config(stages="exact"))
    assert plan.config.fuse == "pairs"
    by_id = plan.task_by_id
    assert by_id["z13.vote"].steps == ("z13.vote", "b001.z13.render")
    assert by_id["z13.vote"].label == "z=13 mip=0 vote + block_render" and by_id["z13.vote"].gpu
    assert by_id["z13.compose"].steps == ("z13.compose", "z13.render")
    for rank in (1, 2, 3):  # the k compute_fields of a section stay apart: they run side by side
        assert by_id[f"z13.t{rank}.compute_field"].steps == (f"z13.t{rank}.compute_field",)
    assert by_id["z13.t1.compute_field"].deps == ("z12.vote",)  # z12's vote task renders z12 into the block
    assert by_id["z13.t3.compute_field"].deps == ("b001.z10.start",)  # the block's start: a copy, its own task
    cpc = by_id["b001.cpc"]
    assert cpc.steps == tuple(f"z{z}.{kind}" for z in range(11, 21) for kind in ("cpc", "cpc_source"))
    assert cpc.deps == tuple(sorted(f"z{z}.compose" for z in range(10, 21))) and not cpc.gpu
    # per step: the tasks it waits on are exactly the tasks of the steps it waits on (no extra waiting)
    task_of = {s: t.id for t in plan.tasks for s in t.steps}
    for task in plan.tasks:
        assert set(task.deps) == {task_of[d] for s in task.steps for d in plan.by_id[s].deps} - {task.id}
    for step in plan.steps:  # every follower in a pair waits on its leader alone
        if task_of[step.id] != step.id and step.kind in ("block_render", "render"):
            assert step.deps == (task_of[step.id],)
    big = build_plan(config(stages="exact", sections={"start": 0, "stop": 1000}))
    assert len(big.tasks) == 4895 and len(big.steps) == 8692


def test_a_7000_section_plan_fuses_into_a_few_thousand_tasks() -> None:
    plan = build_plan(config(fuse="block", sections={"start": 0, "stop": 7000}, stages="exact"))
    assert len(plan.tasks) == 3 * 700 - 1 and len(plan.steps) > 60_000


def _copy_argv(root: Path, name: str, upstream: tuple[str, ...] = (), src: str = "img") -> list[str]:
    markers = root / "out" / ".seamless" / "steps"
    argv = ["--marker", str(markers / f"{name}.json")]
    for dep in upstream:
        argv += ["--upstream", str(markers / f"{dep}.json")]
    return argv + ["copy", "--src", str(root / src), "--dst", str(root / "out" / name), "--kind", "image",
                   "--mip", "0", "--z", "0:1"]


def test_then_runs_the_steps_in_order_and_stops_at_the_first_failure(tmp_path, capsys) -> None:
    from test_steps import make_layer

    make_layer(tmp_path / "img", np.full((1, 1, 64, 64), 9, np.uint8), chunk=64)
    steps = tmp_path / "out" / ".seamless" / "steps"
    fused = _copy_argv(tmp_path, "a") + [THEN] + _copy_argv(tmp_path, "b", ("a",))
    assert main(fused) == ExitCode.OK
    first = json.loads((steps / "a.json").read_text())["run_id"]
    assert (steps / "b.json").exists() and (tmp_path / "out" / "b" / "info").exists()
    ran = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["step"] for r in ran] == ["copy", "copy"] and not any("skipped" in r for r in ran)
    assert main(fused) == ExitCode.OK  # a rerun skips both: run ids unchanged
    assert json.loads((steps / "a.json").read_text())["run_id"] == first
    skipped = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert skipped == [{**r, "skipped": True} for r in ran]  # each step's figures again, from its marker
    (steps / "b.json").unlink()
    failing = _copy_argv(tmp_path, "b", ("a",)) + [THEN] + _copy_argv(tmp_path, "c", ("b",), src="missing") + [
        THEN] + _copy_argv(tmp_path, "d", ("c",))
    assert main(failing) == ExitCode.INVALID_INPUT
    assert (steps / "b.json").exists() and not (steps / "c.json").exists() and not (steps / "d.json").exists()
    assert "no layer" in capsys.readouterr().err
    assert main(_copy_argv(tmp_path, "e") + [THEN]) == ExitCode.INVALID_INPUT  # nothing after --then


PROJECT = """\
source: {source}
destination: {destination}
sections: {{start: 0, stop: {stop}}}
stages: serial
blocks: {{size: 2, decay_dist: 100}}
cpc: {{mip: 1, patch: 16}}
fuse: {fuse}
"""


def test_a_block_fused_plan_run_task_by_task_gives_the_image_of_seamless_align(tmp_path) -> None:
    size, sections = 256, 5
    stack = deformed_stack(tmp_path, [0] * sections, size, max_translation=6.0, cracked=(), debris=())
    local = tmp_path / "local.yaml"
    local.write_text(PROJECT.format(source=stack.path, destination=tmp_path / "local", stop=sections, fuse="none"))
    assert main(["align", str(local), "--workers", "2", "--no-report"]) == ExitCode.OK
    fused = tmp_path / "fused.yaml"
    fused.write_text(PROJECT.format(source=stack.path, destination=tmp_path / "fused", stop=sections, fuse="block"))
    from seamless_core.cli_workflow import load_project

    plan = build_plan(load_project(fused, None))
    assert len(plan.tasks) < len(plan.steps) // 3
    for task in plan.tasks:  # what the DAG's tasks run, one command line each
        assert main(plan.task_argv(task)) == ExitCode.OK, task.id
    region = BBox((0, 0, 0), (size, size, sections))
    got = open_layer(str(tmp_path / "fused" / "image"), LayerKind.IMAGE).read(region)
    want = open_layer(str(tmp_path / "local" / "image"), LayerKind.IMAGE).read(region)
    assert np.array_equal(got, want)
    names = sorted(p.name for p in (tmp_path / "fused" / ".seamless" / "steps").glob("*.json"))
    assert names == sorted(p.name for p in (tmp_path / "local" / ".seamless" / "steps").glob("*.json"))


# --- the DAG ---------------------------------------------------------------------------------------
def test_dag_has_one_task_per_plan_task_and_refuses_another_fuse(tmp_path, monkeypatch) -> None:
    os.environ.setdefault("AIRFLOW_HOME", "/tmp/seamless-test-airflow-home")
    pytest.importorskip("airflow.sdk", reason="needs the airflow extra")
    import yaml
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import AirflowFailException

    from operators.local import PlanStepRef, structure_key

    root = Path(__file__).resolve().parents[1]
    data = {"source": "file:///nowhere/stack", "destination": str(tmp_path / "out"),
            "sections": {"start": 0, "stop": 25}, "blocks": {"size": 10}, "fuse": "block"}
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("SEAMLESS_PROJECT", str(path))
    monkeypatch.setenv("SEAMLESS_EXECUTOR", "local")
    bag = DagBag(dag_folder=str(root / "dags" / "seamless_align.py"), known_pools={"default_pool", "seamless_gpu"})
    assert bag.import_errors == {}
    dag = bag.dags["seamless_align"]
    plan = build_plan(parse_config(data))
    priorities = plan.task_priorities()
    assert set(dag.task_dict) == {t.id for t in plan.tasks}
    for task in plan.tasks:
        op = dag.task_dict[task.id]
        assert op.upstream_task_ids == set(task.deps)
        assert op.step == plan.task_argv(task) and op.task_display_name == task.label
        assert op.priority_weight == priorities[task.id]
        assert op.pool == ("seamless_gpu" if task.gpu else "default_pool")
    assert dag.task_dict["b001.chain"].task_group.group_id == "block_001"
    assert dag.task_dict["b001.final"].task_group.group_id == "render"
    assert dag.task_dict["b001.cpc"].task_group.group_id == "quality"
    assert dag.params["fuse"] == "block"
    base = parse_config(data).model_dump(mode="json")
    ref = PlanStepRef(base, str(path), "b001.final", structure_key(plan))
    assert ref.argv({}) == plan.task_argv(plan.task_by_id["b001.final"])
    with pytest.raises(AirflowFailException, match="changed: fuse"):
        ref.argv({"fuse": "none"})
