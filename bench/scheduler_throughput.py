"""Task instances per second through a real local Airflow scheduler (the embedded default's set-up).

Starts `airflow standalone` as scripts/embedded.py and tests/test_backfill.py do (SQLite metadata DB,
LocalExecutor, its own AIRFLOW_HOME in a temporary folder), with a DAGs folder holding one generated
DAG: N trivial Python tasks (each returns at once), `width` of them independent at a time (a chain of
N / width layers: the shape of many blocks' serial chains). It triggers one run and reads Airflow's own
metadata DB (read-only) until every task instance succeeded:

* **throughput** = N / (last task end - run start): what the scheduler, the executor and the task
  runner together sustain on this machine with `--parallelism` task processes;
* **per task**: the task runner's own time (start -> end of a task that does nothing: the process
  fork, the DAG file parse, the execution API calls) and the scheduling latency (previous layer's last
  end -> this task's start).

Every figure carries the load average. Run:
    .venv/bin/python bench/scheduler_throughput.py [--tasks 200] [--width 10] [--parallelism 4] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DAG = '''
from airflow.sdk import DAG, task

with DAG(dag_id="bench_noop", schedule=None, catchup=False, max_active_tasks={active}) as dag:
    @task
    def noop():
        return None

    previous = None
    for layer in range({layers}):
        current = [noop.override(task_id=f"l{{layer}}_t{{i}}")() for i in range({width})]
        if previous is not None:
            for a, b in zip(previous, current):
                a >> b
        previous = current
'''


def query(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql).fetchall()


def parse(ts: str | None) -> float | None:
    if not ts:
        return None
    return datetime.fromisoformat(ts.replace(" ", "T")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--width", type=int, default=10, help="independent tasks per layer")
    parser.add_argument("--parallelism", type=int, default=4, help="AIRFLOW__CORE__PARALLELISM: task processes at once")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import embedded_env

    layers = max(1, args.tasks // args.width)
    tasks = layers * args.width
    work = Path(tempfile.mkdtemp(prefix="bench-scheduler-"))
    dags = work / "dags"
    dags.mkdir()
    (dags / "bench_noop.py").write_text(DAG.format(layers=layers, width=args.width, active=max(16, args.parallelism)))
    port = embedded_env.free_port()
    env = embedded_env.environment(work, port, dags, parallelism=args.parallelism)
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True)
    db = home / "airflow.db"
    load_start = os.getloadavg()[0]
    started = time.monotonic()
    with open(home / "standalone.log", "wb") as log:
        proc = subprocess.Popen(["airflow", "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        embedded_env.wait_healthy(port, proc, timeout=300)
        up = time.monotonic() - started

        def airflow(*cmd: str) -> str:
            return subprocess.run(["airflow", *cmd], env=env, capture_output=True, text=True, check=True).stdout

        deadline = time.monotonic() + 300
        while "bench_noop" not in airflow("dags", "list", "-o", "plain"):
            if time.monotonic() > deadline:
                raise SystemExit("the DAG processor did not load the benchmark DAG:\n" + airflow("dags", "list-import-errors"))
            time.sleep(2)
        airflow("dags", "unpause", "bench_noop")
        triggered = time.time()
        airflow("dags", "trigger", "bench_noop", "--run-id", "bench")
        deadline = time.monotonic() + args.timeout
        while True:
            rows = query(db, "select state, count(*) from task_instance where dag_id = 'bench_noop' group by state")
            states = dict(rows)
            if states.get("success", 0) == tasks or states.get("failed"):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out: {states}")
            time.sleep(2)
        load_end = os.getloadavg()[0]
        tis = query(db, "select task_id, start_date, end_date, queued_dttm from task_instance where dag_id = 'bench_noop'")
        run_start = query(db, "select start_date from dag_run where dag_id = 'bench_noop'")[0][0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    shutil.rmtree(work, ignore_errors=True)
    if states.get("failed"):
        raise SystemExit(f"some benchmark tasks failed: {states}")
    start0 = parse(run_start) or triggered
    starts = {t: parse(s) for t, s, _, _ in tis}
    ends = {t: parse(e) for t, _, e, _ in tis}
    last_end = max(ends.values())
    span = last_end - start0
    runner = [ends[t] - starts[t] for t in ends]
    latency = []
    for layer in range(1, layers):
        previous_end = max(ends[f"l{layer - 1}_t{i}"] for i in range(args.width))
        latency += [starts[f"l{layer}_t{i}"] - previous_end for i in range(args.width)]
    rate = tasks / span
    text = "\n".join([
        f"`airflow standalone` (Airflow {airflow_version()}, SQLite, LocalExecutor, parallelism {args.parallelism}) on this "
        f"machine ({os.cpu_count()} CPUs); one run of a generated DAG of {tasks} trivial Python tasks, {args.width} "
        f"independent per layer, {layers} layers.",
        "",
        "| measurement | figure | load avg |",
        "|---|---:|---:|",
        f"| task instances per second (all {tasks} / (last end - run start)) | **{rate:.2f}** | {load_end:.1f} |",
        f"| run wall time | {span:.0f} s | {load_end:.1f} |",
        f"| task runner per task (start -> end of a no-op task), median / p90 | {statistics.median(runner):.2f} / "
        f"{_p90(runner):.2f} s | {load_end:.1f} |",
        "| scheduling latency (previous layer's last end -> start), median / p90 | "
        + (f"{statistics.median(latency):.2f} / {_p90(latency):.2f} s" if latency else "-") + f" | {load_end:.1f} |",
        f"| airflow standalone up (healthy) | {up:.0f} s | {load_start:.1f} |",
        "",
        f"Command: `.venv/bin/python bench/scheduler_throughput.py --tasks {args.tasks} --width {args.width} --parallelism "
        f"{args.parallelism} --out docs/benchmarks.md`.",
    ])
    print(text)
    if args.out:
        from report import save_results, write_section

        write_section(args.out, "scheduler", "Scheduler throughput", text)
        save_results("scheduler", {"tasks": tasks, "width": args.width, "parallelism": args.parallelism,
                                   "ti_per_s": rate, "runner_median_s": statistics.median(runner),
                                   "latency_median_s": statistics.median(latency) if latency else None,
                                   "load": load_end})


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def airflow_version() -> str:
    from importlib.metadata import version

    return version("apache-airflow")


if __name__ == "__main__":
    main()
