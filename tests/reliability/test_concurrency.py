"""Issue #7, point 7: two runs over overlapping section ranges into one destination are refused or
serialised, never interleaved into a corrupt volume.

What the product does (seamless_core/locks.py, docs/workflow.md "One run per destination"):

* `seamless align` holds `<destination>/.seamless/lock` exclusively (an flock: released by the kernel when
  the holder dies, so never stale); a second `seamless align` into that destination, over any section
  range, is refused at once with exit 3 naming the holder;
* a plan step started on its own (`seamless --marker ... STEP`, the command of every Airflow task) holds the
  same lock shared: Airflow tasks run side by side, but a step is refused while a `seamless align` writes
  the destination, and a `seamless align` is refused while a step runs;
* DAG runs are serialised by Airflow: `seamless_align` has max_active_runs=1 (the scheduler's own query
  starts one queued run of two), and Airflow allows one running backfill per DAG, so two section-range
  backfills of `seamless_align_blocks` over overlapping sections are refused.

The first two are tested with real processes: the first run is frozen (SIGSTOP) mid-way while it holds the
lock, the contenders run to their end, nothing of the destination changes meanwhile, and after SIGCONT the
first run's volume is byte-identical to an uncontended run's. The third runs real Airflow (SQLite metadata
DB migrated here, the DAG files parsed, the scheduler's own step that starts queued runs, `airflow
backfill create`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from workflow_helpers import deformed_stack

from seamless_core.config import load_config
from seamless_core.errors import ExitCode
from seamless_core.executor import destination_lock
from seamless_core.plan import build_plan

REPO = Path(__file__).resolve().parents[2]
SIZE = 256
PROJECT = """\
source: {source}
destination: {destination}
sections: {{start: {start}, stop: {stop}}}
stages: serial
pad: 16
blocks: {{size: 2, decay_dist: 1000}}
cpc: {{mip: 1, patch: 16}}
"""
SKIP = {".seamless", ".staging", "report"}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deformed_stack(tmp_path_factory.mktemp("concurrency"), [0, 0, 0], SIZE, chunk=128, max_translation=6.0,
                          cracked=(), debris=()).path


def project(root: Path, source: Path, name: str, destination: Path, start: int = 0, stop: int = 3) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(PROJECT.format(source=source, destination=destination, start=start, stop=stop))
    return path


def seamless(*args: str) -> list[str]:
    return [sys.executable, "-m", "seamless_core", *args]


def snapshot(destination: Path) -> dict[str, bytes]:
    """Every data file under a destination (markers, logs and staging left out), the destination's own
    path masked in metadata so two destinations compare."""
    files = {}
    for folder, dirs, names in os.walk(destination):
        dirs[:] = [d for d in dirs if d not in SKIP]
        for name in names:
            path = Path(folder) / name
            data = path.read_bytes()
            if name == "info" or name.endswith(".json"):
                data = data.replace(str(destination).encode(), b"<destination>")
            files[str(path.relative_to(destination))] = data
    return files


def tree(destination: Path) -> dict[str, tuple[int, int]]:
    """Every file under a destination with its size and mtime: what any writer would change."""
    out = {}
    for folder, _, names in os.walk(destination):
        for name in names:
            stat = (Path(folder) / name).stat()
            out[str(Path(folder, name).relative_to(destination))] = (stat.st_size, stat.st_mtime_ns)
    return out


@contextmanager
def frozen_when(process: subprocess.Popen[str], ready, timeout: float = 180.0) -> Iterator[None]:
    """Wait until `ready()` while `process` runs, SIGSTOP its process group for the block, then SIGCONT.

    A stopped process keeps its flock: to a contender it is a run that is slow right now, mid-way."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the first run ended before it was frozen (exit {process.returncode})"
        assert time.monotonic() < deadline, "the first run never reached the point to freeze it at"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(process.pid, signal.SIGCONT)


def holds_flock(pid: int, mode: str) -> bool:
    """Whether `pid` holds an flock (mode READ = shared, WRITE = exclusive), from /proc/locks."""
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if len(parts) > 4 and parts[1] == "FLOCK" and parts[3] == mode and parts[4] == str(pid):
            return True
    return False


def test_two_aligns_over_overlapping_sections_never_interleave(source: Path, tmp_path: Path) -> None:
    reference = project(tmp_path, source, "reference", tmp_path / "reference")
    assert subprocess.run(seamless("align", str(reference), "--workers", "2", "--no-report"),
                          capture_output=True, text=True, timeout=600).returncode == 0
    expected = snapshot(tmp_path / "reference")

    shared = tmp_path / "shared"
    first = project(tmp_path, source, "first", shared)  # sections 0:3, anchored at 0
    second = project(tmp_path, source, "second", shared, start=1, stop=3)  # 1:3, anchored at 1: other fields
    plan_first, plan_second = build_plan(load_config(first)), build_plan(load_config(second))
    markers = shared / ".seamless" / "steps"
    run = subprocess.Popen(seamless("align", str(first), "--workers", "1", "--no-report"), start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with frozen_when(run, lambda: holds_flock(run.pid, "WRITE") and len(list(markers.glob("*.json"))) >= 3):
            done = len(list(markers.glob("*.json")))
            assert done < len(plan_first.steps), "the first run had finished: nothing to contend with"
            before = tree(shared)
            # a second `seamless align` over overlapping sections, and one of its plan steps as an Airflow task
            # runs it, both at once while the first run is mid-way
            step = plan_second.steps[0]
            contenders = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                          for argv in (seamless("align", str(second), "--no-report"), seamless(*plan_second.argv(step)))]
            outputs = [(c.wait(timeout=300), c.stdout.read()) for c in contenders]  # type: ignore[union-attr]
            assert tree(shared) == before, "a refused run wrote into the destination"
            assert run.poll() is None
        (align_code, align_out), (step_code, step_out) = outputs
        assert align_code == ExitCode.INVALID_INPUT, align_out[-2000:]
        assert f"another `seamless align` is writing into file://{shared} ({{\"pid\": {run.pid}" in align_out, align_out
        assert "Traceback" not in align_out
        assert step_code == ExitCode.INVALID_INPUT, step_out[-2000:]
        assert f"another `seamless align` is writing into file://{shared} ({{\"pid\": {run.pid}" in step_out, step_out
        assert "this step was refused" in step_out
        assert "Traceback" not in step_out
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[-3000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    # the destination holds the first run's volume exactly, as if it had run alone
    got = snapshot(shared)
    assert sorted(got) == sorted(expected)
    assert [k for k in expected if got[k] != expected[k]] == []
    assert sorted(p.stem for p in markers.glob("*.json")) == sorted(s.id for s in plan_first.steps)
    for s in plan_first.steps:  # every marker is the first plan's: its command line, not the second's
        assert json.loads((markers / f"{s.id}.json").read_text())["args"] == list(s.args)
    # released on exit, nothing stale: the lock file names no holder and the second run may go now
    assert (shared / ".seamless" / "lock").read_text() == ""
    with destination_lock(plan_second):
        pass
    print(f"\nfirst run frozen after {done}/{len(plan_first.steps)} steps; second align and one of its steps "
          f"refused (exit 3); {len(expected)} output files byte-identical to the uncontended run")


def test_a_running_airflow_step_keeps_seamless_align_out(source: Path, tmp_path: Path) -> None:
    config = project(tmp_path, source, "project", tmp_path / "out")
    plan = build_plan(load_config(config))
    step = plan.steps[0]  # the block start: what an Airflow task (local twin or pod) runs
    task = subprocess.Popen(seamless(*plan.argv(step)), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        with frozen_when(task, lambda: holds_flock(task.pid, "READ")):
            before = tree(tmp_path / "out")
            align = subprocess.run(seamless("align", str(config), "--no-report"), capture_output=True, text=True,
                                   timeout=300)
            assert tree(tmp_path / "out") == before, "the refused align wrote into the destination"
        assert align.returncode == ExitCode.INVALID_INPUT, align.stderr[-2000:]
        assert "the steps of another run (`seamless --marker ...`: Airflow tasks) are writing into" in align.stderr
        assert "Traceback" not in align.stderr + align.stdout
        out, _ = task.communicate(timeout=300)
        assert task.returncode == 0, out[-3000:]
    finally:
        if task.poll() is None:
            os.killpg(task.pid, signal.SIGKILL)
            task.wait()
    # two steps of one run share the lock: the next step runs while nothing else holds it exclusively
    second = subprocess.run(seamless(*plan.argv(plan.steps[1])), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]


DRIVER = textwrap.dedent("""
    import json, sys
    from datetime import timedelta
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType
    from airflow.sdk import timezone
    from airflow.serialization.serialized_objects import DagSerialization

    dags = sys.argv[1]
    DagBundlesManager().sync_bundles_to_db()
    bag = BundleDagBag(dag_folder=dags, bundle_path=dags, bundle_name="dags-folder")
    assert not bag.import_errors, bag.import_errors
    sync_bag_to_db(bag, "dags-folder", None)
    dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(bag.dags["seamless_align"]))
    earlier = timezone.utcnow() - timedelta(minutes=1)
    with create_session() as session:
        for i in range(2):  # two triggered runs of the same DAG (same project, same destination)
            dag.create_dagrun(run_id=f"manual__overlap_{i}", logical_date=None, data_interval=None,
                              run_after=earlier + timedelta(seconds=i), conf={"destination": sys.argv[2]},
                              run_type=DagRunType.MANUAL, state=DagRunState.QUEUED,
                              triggered_by=DagRunTriggeredByType.TEST, triggering_user_name="test", session=session)
    scheduler = SchedulerJobRunner(job=Job())
    for _ in range(2):  # two turns of the scheduler loop's step that starts queued runs
        with create_session() as session:
            scheduler._start_queued_dagruns(session)
    with create_session() as session:
        states = {r.run_id: r.state for r in session.query(DagRun).filter(DagRun.dag_id == "seamless_align")}
    print(json.dumps({"states": states, "max_active_runs": bag.dags["seamless_align"].max_active_runs}))
""")


def test_overlapping_dag_runs_are_serialised_or_refused_by_airflow(source: Path, tmp_path: Path) -> None:
    pytest.importorskip("airflow.sdk", reason="needs the airflow extra (scripts/test.sh installs it)")
    config = project(tmp_path, source, "dag", tmp_path / "dag-out", stop=3)
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False", "SEAMLESS_PROJECT": str(config), "SEAMLESS_EXECUTOR": "local", "PYTHONPATH": str(REPO),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=600, check=False)

    migrated = run("airflow", "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    # seamless_align: two triggered runs over the same sections and destination; the scheduler starts one
    driven = run(sys.executable, "-c", DRIVER, str(REPO / "dags"), str(tmp_path / "dag-out"))
    assert driven.returncode == 0, (driven.stdout + driven.stderr)[-4000:]
    result = json.loads(driven.stdout.strip().splitlines()[-1])
    assert result["max_active_runs"] == 1
    assert result["states"] == {"manual__overlap_0": "running", "manual__overlap_1": "queued"}, result
    # seamless_align_blocks: a backfill of sections 0:2, then one of 1:3 (overlapping) while the first is active
    first = run(sys.executable, "-m", "seamless_core.cli_backfill", str(config), "--z", "0:2")
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    second = run(sys.executable, "-m", "seamless_core.cli_backfill", str(config), "--z", "1:3")
    assert second.returncode != 0, second.stdout[-2000:]
    assert "Another backfill is running for Dag seamless_align_blocks" in second.stdout + second.stderr
    print("\nseamless_align: 2 runs triggered, the scheduler started 1, the other stays queued; "
          "seamless_align_blocks: the overlapping backfill refused by Airflow")
