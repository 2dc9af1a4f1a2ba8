"""Section-range backfills: the `seamless_align_blocks` DAG, its timetable and `seamless backfill`.

Structure tests parse the DAG with Airflow's DagBag and serialize it with the timetable plugin loaded; the
end-to-end test runs the embedded default (`airflow standalone` started as scripts/embedded.py starts it:
SQLite, LocalExecutor, the pool seamless_gpu with 2 slots) on a 7-section project of 3 blocks, backfills
all sections with `seamless backfill` (which runs `airflow backfill create`), waits for the runs, and
compares the image with `seamless align`'s on the same project; a second backfill with reprocess none
must create no run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/seamless-test-airflow-home")
pytest.importorskip("airflow.sdk", reason="needs the airflow extra (scripts/test.sh installs it)")

import numpy as np
import yaml
from airflow.dag_processing.dagbag import DagBag

from operators.block_tasks import BlockStepOperator, EarlierBlocksSensor
from operators.section_timetable import SectionBlockTimetable
from seamless_core.block_runs import EPOCH, BlockRuns, backfill_command, block_of_key, load_project
from seamless_core.errors import InputError
from seamless_core.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
DAGS, PLUGINS = ROOT / "dags", ROOT / "plugins"
POOLS = {"default_pool", "seamless_gpu"}
DAG_ID = "seamless_align_blocks"


def project(tmp_path: Path, stop: int, name: str = "project", **extra) -> Path:
    data = {"source": "file:///nowhere/stack", "destination": str(tmp_path / "out"),
            "sections": {"start": 0, "stop": stop}, "blocks": {"size": 10}, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def with_plugins(monkeypatch):
    """Airflow's plugin registry with plugins/ loaded, as the scheduler and DAG processor have it."""
    from airflow import plugins_manager, settings

    def clear() -> None:
        for name in dir(plugins_manager):
            func = getattr(plugins_manager, name)
            if callable(func) and hasattr(func, "cache_clear"):
                func.cache_clear()

    monkeypatch.setattr(settings, "PLUGINS_FOLDER", str(PLUGINS))
    clear()
    yield
    clear()


def parse(monkeypatch, path: Path) -> DagBag:
    monkeypatch.setenv("SEAMLESS_PROJECT", str(path))
    monkeypatch.setenv("SEAMLESS_EXECUTOR", "local")
    return DagBag(dag_folder=str(DAGS / "seamless_align_blocks.py"), known_pools=POOLS)


# --- the mapping (no Airflow) -------------------------------------------------------------------------
def test_blocks_map_to_dates_keys_and_section_ranges(tmp_path) -> None:
    runs = BlockRuns(build_plan(load_project(project(tmp_path, 25))))
    assert [(r.index, r.first, r.last) for r in runs.runs] == [(0, 0, 10), (1, 11, 20), (2, 21, 24)]
    assert runs.runs[1].key == "sections 11-20 (block 1)" and block_of_key(runs.runs[1].key) == 1
    assert runs.runs[2].date.isoformat() == "2000-01-03T00:00:00+00:00"
    assert [r.index for r in runs.for_range(10, 12)] == [0, 1]  # every block that outputs one of them
    assert [r.index for r in runs.for_range(21, 22)] == [2]
    with pytest.raises(InputError, match="outside the project's sections 0:25"):
        runs.for_range(30, 40)
    with pytest.raises(InputError, match="names no block"):
        runs.by_key("2000-01-02")
    with pytest.raises(InputError, match="not a block of this project"):
        runs.by_key("sections 11-21 (block 1)")
    argv = backfill_command(runs.for_range(0, 25), dag_id=DAG_ID, reprocess="failed")
    assert argv[argv.index("--from-date") + 1] == EPOCH.isoformat()
    assert argv[argv.index("--to-date") + 1] == "2000-01-03T00:00:00+00:00"
    assert argv[argv.index("--reprocess-behavior") + 1] == "failed"
    with pytest.raises(InputError, match="none .* failed .* completed"):
        backfill_command(runs.runs, dag_id=DAG_ID, reprocess="all")


def test_backfill_helper_prints_the_airflow_command_and_refuses_bad_ranges(tmp_path) -> None:
    path = project(tmp_path, 25)

    def helper(*args: str, command: tuple[str, ...] = (str(Path(sys.executable).with_name("seamless")), "backfill")
               ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, "SEAMLESS_PROJECT": str(path)})

    shown = helper("--z", "12:22", "--reprocess", "completed", "--print-only")
    assert shown.returncode == 0, shown.stderr
    as_module = helper("--z", "12:22", "--reprocess", "completed", "--print-only",
                       command=(sys.executable, "-m", "seamless_core.cli_backfill"))
    assert (as_module.returncode, as_module.stdout) == (0, shown.stdout)
    assert "sections 11-20 (block 1)" in shown.stdout and "sections 21-24 (block 2)" in shown.stdout
    assert ("airflow backfill create --dag-id seamless_align_blocks --from-date 2000-01-02T00:00:00+00:00 "
            "--to-date 2000-01-03T00:00:00+00:00 --reprocess-behavior completed") in shown.stdout
    assert "z10.vote" in shown.stderr  # block 1 needs block 0's vote of section 10, not done: said so
    outside = helper(str(path), "--z", "40:50", "--print-only")
    assert outside.returncode == 3 and "outside the project's sections 0:25" in outside.stderr
    assert helper("--z", "5:5", "--print-only").returncode == 3


def test_every_step_runs_in_exactly_one_block(tmp_path) -> None:
    plan = build_plan(load_project(project(tmp_path, 25, bad_sections=[10, 13])))
    runs = BlockRuns(plan)
    owned = [s.id for r in runs.runs for s in runs.steps(r.index).values()]
    assert sorted(owned) == sorted(s.id for s in plan.steps)
    for run in runs.runs:  # a block's final sections are composed, rendered and measured in its own run
        zs = {s.z for s in runs.steps(run.index).values() if s.kind == "render"}
        assert zs == set(range(run.first, run.last + 1))


def test_timetable_iterates_blocks_by_partition_date_and_serializes() -> None:
    import pendulum

    table = SectionBlockTimetable(["sections 0-10 (block 0)", "sections 11-20 (block 1)", "sections 21-24 (block 2)"])
    infos = list(table.iter_partition_dagrun_infos(earliest=pendulum.datetime(2000, 1, 2),
                                                   latest=pendulum.datetime(2000, 1, 3)))
    assert [i.partition_key for i in infos] == ["sections 11-20 (block 1)", "sections 21-24 (block 2)"]
    assert infos[0].partition_date == pendulum.datetime(2000, 1, 2) and infos[0].data_interval is None
    # a bound given in another timezone is read by its wall clock, as a picked date means
    east = pendulum.datetime(2000, 1, 2, tz="Asia/Tokyo")
    assert [i.partition_key for i in table.iter_partition_dagrun_infos(earliest=east, latest=east)] == [infos[0].partition_key]
    assert table.resolve_partition_date("sections 21-24 (block 2)") == pendulum.datetime(2000, 1, 3)
    assert SectionBlockTimetable.deserialize(table.serialize()) == table
    assert table.next_dagrun_info_v2(last_dagrun_info=None, restriction=None) is None  # backfills only
    run_id = table.generate_run_id(run_type=_backfill_type(), run_after=infos[0].run_after, data_interval=None,
                                   partition_key=infos[0].partition_key)
    assert run_id.startswith("backfill__sections_11-20_block_1__"), run_id


def _backfill_type():
    from airflow.utils.types import DagRunType

    return DagRunType.BACKFILL_JOB


# --- the DAG -----------------------------------------------------------------------------------------
def test_dag_imports_cleanly_and_serializes_with_the_plugin(tmp_path, monkeypatch, with_plugins) -> None:
    from airflow.serialization.serialized_objects import DagSerialization

    bag = parse(monkeypatch, project(tmp_path, 25))
    assert bag.import_errors == {} and bag.captured_warnings == {} and bag.dag_warnings == set()
    dag = bag.dags[DAG_ID]
    assert dag.timetable.periodic and dag.timetable.partitioned and not dag.timetable.can_be_scheduled
    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert restored.timetable == dag.timetable
    assert set(restored.task_dict) == set(dag.task_dict)


def test_parsing_for_another_dag_builds_nothing(tmp_path, monkeypatch) -> None:
    """`airflow dags test seamless_align` serializes every DAG it parsed: this one must not need the plugin there."""
    from airflow.sdk.definitions.context import _AIRFLOW_PARSING_CONTEXT_DAG_ID

    monkeypatch.setenv("SEAMLESS_PROJECT", str(project(tmp_path, 25)))
    monkeypatch.setenv(_AIRFLOW_PARSING_CONTEXT_DAG_ID, "seamless_align")  # what Airflow sets for that DAG
    bag = DagBag(dag_folder=str(DAGS), known_pools=POOLS)
    assert bag.import_errors == {} and set(bag.dag_ids) == {"seamless_align"}
    monkeypatch.setenv(_AIRFLOW_PARSING_CONTEXT_DAG_ID, DAG_ID)  # a task of this DAG: built
    assert DAG_ID in DagBag(dag_folder=str(DAGS / "seamless_align_blocks.py"), known_pools=POOLS).dag_ids


def test_a_block_run_has_the_plans_steps_of_that_block_and_their_deps(tmp_path, monkeypatch) -> None:
    path = project(tmp_path, 25)
    dag = parse(monkeypatch, path).dags[DAG_ID]
    plan = build_plan(load_project(path))
    runs = BlockRuns(plan)
    templates = {t.id: t for t in runs.templates()}
    assert set(dag.task_dict) == set(templates) | {f"wait.{k}" for k in ("render", "stitch", "vote")}
    for run in runs.runs:
        steps = runs.steps(run.index)
        template_of = {s.id: t for t, s in steps.items()}
        for template, step in steps.items():
            task = dag.task_dict[template]
            assert isinstance(task, BlockStepOperator)
            context = {"partition_key": run.key}
            assert task.resolved_step(context) == plan.argv(step)  # the very command `seamless align` runs
            inside = {template_of[d] for d in step.deps if d in template_of}
            outside = {f"wait.{plan.by_id[d].kind}" for d in step.deps if d not in template_of}
            # upstream tasks are the union over blocks; those that do something in this block's run are
            # exactly the step's own dependencies (the others skip: the block has no such step or wait)
            active = {u for u in task.upstream_task_ids
                      if (u.startswith("wait.") and runs.external(run.index, u[5:])) or runs.step(run.index, u)}
            assert active == inside | outside, (run.index, step.id)
            assert task.pool == ("seamless_gpu" if step.gpu else "default_pool")
    # block 2's composes wait for block 1's stitch; its stitch for block 1's vote of their shared section 20
    assert [s.id for s in runs.external(2, "stitch")] == ["b001.stitch"]
    assert [s.id for s in runs.external(2, "vote")] == ["z20.vote"]
    assert [s.id for s in runs.external(2, "render")] == ["z20.render"]
    assert runs.external(0) == []
    assert dag.task_dict["p3.vote"].task_display_name == "z=s+3 mip=2 vote"  # serial stages: the field lives at MIP 2
    assert dag.task_dict["p3.vote"].task_group.group_id == "chain"
    assert isinstance(dag.task_dict["wait.stitch"], EarlierBlocksSensor) and dag.task_dict["wait.stitch"].mode == "reschedule"


def test_a_task_refuses_a_run_without_a_block_and_skips_what_its_block_lacks(tmp_path, monkeypatch) -> None:
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    path = project(tmp_path, 25)
    dag = parse(monkeypatch, path).dags[DAG_ID]
    task = dag.task_dict["p10.vote"]
    with pytest.raises(AirflowFailException, match="one block of sections per run.*partition key"):
        task.resolved_step({"partition_key": None})
    with pytest.raises(AirflowFailException, match="not a block of this project"):
        task.resolved_step({"partition_key": "sections 1-2 (block 7)"})
    with pytest.raises(AirflowSkipException, match="block 2 .* has no step p10.vote"):
        task.resolved_step({"partition_key": "sections 21-24 (block 2)"})  # the last block is shorter


def test_kubernetes_executor_gives_pod_tasks_with_the_blocks_commands(tmp_path, monkeypatch) -> None:
    pytest.importorskip("airflow.providers.cncf.kubernetes")
    from operators.pod import SeamlessPodOperator

    path = project(tmp_path, 25)
    monkeypatch.setenv("SEAMLESS_PROJECT", str(path))
    monkeypatch.setenv("SEAMLESS_EXECUTOR", "kubernetes")
    bag = DagBag(dag_folder=str(DAGS / "seamless_align_blocks.py"), known_pools=POOLS)
    assert bag.import_errors == {}
    dag = bag.dags[DAG_ID]
    plan = build_plan(load_project(path))
    task = dag.task_dict["p2.vote"]
    assert isinstance(task, SeamlessPodOperator) and task.pool_kind == "gpu"
    assert task.resolved_step({"partition_key": "sections 11-20 (block 1)"}) == plan.argv(plan.by_id["z12.vote"])


def test_earlier_blocks_sensor_waits_for_current_markers(tmp_path, monkeypatch) -> None:
    from airflow.sdk.exceptions import AirflowSkipException

    from seamless_core.markers import MarkedStep

    path = project(tmp_path, 25)
    dag = parse(monkeypatch, path).dags[DAG_ID]
    plan = build_plan(load_project(path))
    sensor = dag.task_dict["wait.vote"]
    block1 = {"partition_key": "sections 11-20 (block 1)"}
    with pytest.raises(AirflowSkipException):
        sensor.poke({"partition_key": "sections 0-10 (block 0)"})  # block 0 needs nothing earlier
    assert sensor.missing(block1) == ["z10.vote"]

    def finish(step_id: str) -> None:  # what `seamless --marker ...` leaves when a step succeeds
        step = plan.by_id[step_id]
        marked = MarkedStep(plan.layout.marker(step.id), tuple(plan.layout.marker(d) for d in step.deps), step.args)
        marked.finish(marked.current_hash(), 0.1)

    for step in plan.steps:  # block 0's chain, all but the vote of the section it shares with block 1
        if step.block == 0 and step.id != "z10.vote":
            finish(step.id)
    assert not sensor.poke(block1)
    finish("z10.vote")
    assert sensor.poke(block1)
    finish(plan.by_id["z10.vote"].deps[0])  # an upstream step redone since: z10.vote's marker is out of date
    assert sensor.missing(block1) == ["z10.vote"]


# --- end to end: the embedded default, a real backfill ------------------------------------------------
SECTIONS, SIZE = 7, 128
E2E_PROJECT = """\
source: {source}
destination: {destination}
sections: {{start: 0, stop: {stop}}}
stages: serial
vote: {{k: 1}}
blocks: {{size: 2, decay_dist: 100}}
cpc: {{mip: 1, patch: 16}}
"""


def _embedded():
    spec = importlib.util.spec_from_file_location("embedded", ROOT / "scripts" / "embedded.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _json_rows(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("[{") or line.strip() == "[]"]
    return json.loads(lines[-1]) if lines else []  # the CLI prints log notices on stdout too


@pytest.mark.slow
def test_section_range_backfill_through_the_real_scheduler(tmp_path: Path) -> None:
    from workflow_helpers import deformed_stack

    from seamless_core.cli import main
    from seamless_core.errors import ExitCode
    from seamless_core.geometry import BBox
    from seamless_core.volumes import LayerKind, open_layer

    started = time.monotonic()
    stack = deformed_stack(tmp_path, [0] * SECTIONS, SIZE, max_translation=4.0, cracked=(), debris=())
    local = tmp_path / "local.yaml"
    local.write_text(E2E_PROJECT.format(source=stack.path, destination=tmp_path / "local", stop=SECTIONS))
    airflow_project = tmp_path / "airflow.yaml"
    airflow_project.write_text(E2E_PROJECT.format(source=stack.path, destination=tmp_path / "airflow", stop=SECTIONS))
    runs = BlockRuns(build_plan(load_project(airflow_project)))
    assert len(runs.runs) == 3

    embedded = _embedded()
    port = embedded.free_port()
    env = embedded.environment(tmp_path / "work", port, airflow_project)
    env.update({"SEAMLESS_WAIT_POKE": "10", "SEAMLESS_WAIT_TIMEOUT": "600",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2"})
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True)

    def airflow(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, timeout=300, check=False)
        assert not check or result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
        return result

    def helper(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "seamless_core.cli_backfill", str(airflow_project), *args],
                              env=env, capture_output=True, text=True, timeout=300, check=False)

    def block_runs() -> list[dict]:
        return _json_rows(airflow("dags", "list-runs", DAG_ID, "-o", "json").stdout)

    with open(home / "standalone.log", "wb") as log:  # the child keeps its own copy of the descriptor
        standalone = subprocess.Popen(["airflow", "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
    try:
        # the reference, while Airflow starts: the same plan through `seamless align`'s local executor
        assert main(["align", str(local), "--workers", "2", "--no-report"]) == ExitCode.OK
        embedded.wait_healthy(port, standalone, timeout=240)
        phases = {"align + airflow up": time.monotonic() - started}
        airflow("pools", "set", "seamless_gpu", "2", "GPU steps")  # what the embedded default creates
        deadline = time.monotonic() + 120
        while DAG_ID not in airflow("dags", "list", "-o", "plain").stdout:
            assert time.monotonic() < deadline, airflow("dags", "list-import-errors", check=False).stdout[-3000:]
            time.sleep(3)

        phases["dag parsed"] = time.monotonic() - started
        first = helper("--z", f"0:{SECTIONS}")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "--reprocess-behavior none" in first.stdout and "sections 0-2 (block 0)" in first.stdout
        deadline = time.monotonic() + 420
        while True:
            listed = block_runs()
            states = {r["run_id"]: r["state"] for r in listed}
            if len(listed) == 3 and all(s in ("success", "failed") for s in states.values()):
                break
            assert time.monotonic() < deadline, f"runs not finished: {states}"
            time.sleep(5)
        phases["runs done"] = time.monotonic() - started
        assert set(states.values()) == {"success"}, (states, _failed_logs(home))
        db = home / "airflow.db"
        keys = _query(db, "select partition_key, run_type from dag_run where dag_id = ? order by partition_date", DAG_ID)
        assert keys == [(r.key, "backfill") for r in runs.runs]  # one run per block, labelled by its sections
        assert all(r["run_id"].startswith("backfill__sections_") for r in listed)
        # a run's stitch waited for the previous block's vote of their shared section, its composes for the
        # earlier stitches: the wait.* sensors held them until those steps' markers were written. With the
        # default fuse (pairs) the vote shares a task with its block render, so the marker, not the task's
        # end, is what the stitch waits for: compare the stitch's start with the marker file's mtime.
        times = {(key, task): (_utc_seconds(start), _utc_seconds(end)) for key, task, start, end in _query(
            db, "select r.partition_key, t.task_id, t.start_date, t.end_date from task_instance t join dag_run r "
            "on t.run_id = r.run_id and t.dag_id = r.dag_id where t.dag_id = ? and t.state = 'success'", DAG_ID)}
        steps = tmp_path / "airflow" / ".seamless" / "steps"
        for previous, run in zip(runs.runs, runs.runs[1:]):
            vote_done = (steps / f"z{run.first - 1}.vote.json").stat().st_mtime  # of section s_b
            assert times[(run.key, "stitch")][0] >= vote_done, (run.key, times[(run.key, "stitch")], vote_done)
        assert times[(runs.runs[2].key, "p1.compose")][0] >= times[(runs.runs[1].key, "stitch")][1]

        region = BBox((0, 0, 0), (SIZE, SIZE, SECTIONS))
        via_backfill = open_layer(str(tmp_path / "airflow" / "image"), LayerKind.IMAGE).read(region)
        via_align = open_layer(str(tmp_path / "local" / "image"), LayerKind.IMAGE).read(region)
        assert np.array_equal(via_backfill, via_align)  # every section, byte for byte
        markers = sorted(p.stem for p in (tmp_path / "airflow" / ".seamless" / "steps").glob("*.json"))
        assert markers == sorted(p.stem for p in (tmp_path / "local" / ".seamless" / "steps").glob("*.json"))

        # the second backfill over the same range, reprocess none: Airflow records it and creates no run
        _wait_backfills_complete(db, timeout=90)
        second = helper("--z", f"0:{SECTIONS}", "--reprocess", "none")
        assert second.returncode == 0, second.stdout + second.stderr
        assert len(block_runs()) == 3
        rows = _query(db, "select dag_run_id, exception_reason from backfill_dag_run where backfill_id = "
                      "(select max(id) from backfill where dag_id = ?)", DAG_ID)
        assert rows == [(None, "already exists")] * 3, rows
        assert _query(db, "select count(*) from backfill where dag_id = ?", DAG_ID) == [(2,)]
        # the UI's backfill dialog asks the REST API for a dry run: per reprocess behaviour, the blocks it would run
        span = {"from_date": runs.runs[0].date.isoformat(), "to_date": runs.runs[-1].date.isoformat()}
        would = {b: _dry_run(port, home, {"dag_id": DAG_ID, **span, "reprocess_behavior": b}) for b in ("none", "failed", "completed")}
        assert would == {"none": [], "failed": [], "completed": [r.key for r in runs.runs]}, would
    finally:
        if standalone.poll() is None:
            os.killpg(standalone.pid, signal.SIGTERM)
            try:
                standalone.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(standalone.pid, signal.SIGKILL)
                standalone.wait()
    print("end-to-end backfill test:", ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()),
          f"total {time.monotonic() - started:.0f} s")


def _dry_run(port: int, home: Path, body: dict) -> list[str]:
    """POST /api/v2/backfills/dry_run as the UI's backfill dialog does (user admin): the partition keys."""
    import urllib.request

    password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
    base = f"http://localhost:{port}"

    def post(path: str, data: dict, token: str | None = None) -> dict:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        request = urllib.request.Request(base + path, json.dumps(data).encode(), headers, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    token = post("/auth/token", {"username": "admin", "password": password})["access_token"]
    return [b["partition_key"] for b in post("/api/v2/backfills/dry_run", body, token)["backfills"]]


def _utc_seconds(stamp: str) -> float:
    """Airflow's metadata DB keeps naive UTC timestamps: seconds since the epoch, to compare with mtimes."""
    from datetime import datetime, timezone

    return datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc).timestamp()


def _query(db: Path, sql: str, *args: object) -> list[tuple]:
    """Read Airflow's own metadata DB (read-only): what the CLI's run listing does not show."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(sql, args).fetchall()


def _wait_backfills_complete(db: Path, timeout: float) -> None:
    """The scheduler marks a backfill complete once its runs finished; only then may another start."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            open_ = conn.execute("select count(*) from backfill where completed_at is null").fetchone()[0]
        if open_ == 0:
            return
        assert time.monotonic() < deadline, "the first backfill was never marked complete"
        time.sleep(2)


def _failed_logs(home: Path) -> str:
    """The tail of the logs of failed tasks, for the assertion message."""
    tails = []
    for path in sorted((home / "logs").rglob("*.log")):
        text = path.read_text(errors="replace")
        if "exited with code" in text or "Traceback" in text:
            tails.append(f"--- {path}\n{text[-1500:]}")
    return "\n".join(tails[-4:])
