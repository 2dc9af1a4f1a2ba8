"""The sample workflow end to end: `seamless align` against Airflow's local twin, at each task granularity.

The sample is the demo volume (`seamless demo --no-align`: the shared ISBI sections, 512 x 512, each
misaligned by a known field) and the project of dags/seamless_project.example.yaml (stages `serial`,
k = 3, blocks of 10). It is aligned

* by `seamless align --workers 1` (the local executor: one warm worker, torch imported once), for
  reference;
* by `airflow dags test seamless_align` with the local twin (SEAMLESS_EXECUTOR=local), once per `fuse`
  value (none: a task per step; pairs; block) with the warm step server (the default: each step a fork
  of a process that imported torch once), and for the `--cold` fuse values once more with a fresh
  `python -m seamless_core` child per task (SEAMLESS_WARM=0). `dags test` runs the tasks one after
  another through Airflow's task runner, so
  **Airflow share = 1 - step work / wall time** (step work: the sum of the markers' seconds of that very
  run) is the share of wall time that is not the steps' work: Airflow's task handling (its metadata DB,
  the task runner), the child's interpreter start and its imports (torch, cloudvolume), the DAG parse of
  the `dags test` command. A fit over the fuse values splits it into a fixed part and a part per task.

Both runners run one step at a time, so the shares compare like with like, and each share is measured
within one run, so a change of the machine's load between runs moves it little. The real scheduler adds its
own latency per task on top (bench/scheduler_throughput.py measures it). Every figure is printed with
the load average of the machine at that moment.

Run: .venv/bin/python bench/airflow_overhead.py [--sections 30] [--fuse none,pairs,block] [--cold block] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import save_results, write_section  # noqa: E402

PROJECT = """\
source: {source}
destination: {destination}
sections: {{start: 0, stop: {stop}}}
stages: serial
vote: {{k: 3}}
blocks: {{size: 10, decay_dist: 100}}
cpc: {{mip: 1, patch: 32}}
device: cpu
fuse: {fuse}
"""
PY = sys.executable
BIN = str(Path(PY).parent)


def load() -> float:
    return os.getloadavg()[0]


def build_sample(work: Path, sections: int) -> str:
    demo = work / "demo"
    if not (demo / "misaligned" / "info").exists():
        subprocess.run([PY, "-m", "seamless_core", "demo", "--out", str(demo), "--no-align", "--sections", str(sections)],
                       cwd=ROOT, check=True, capture_output=True, text=True)
    return "file://" + str(demo / "misaligned")


def project(work: Path, name: str, source: str, sections: int, fuse: str) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(PROJECT.format(source=source, destination=work / name, stop=sections, fuse=fuse))
    return path


def marker_seconds(destination: Path) -> dict[str, float]:
    out = {}
    for path in glob.glob(str(destination / ".seamless" / "steps" / "*.json")):
        out[Path(path).stem] = float(json.loads(Path(path).read_text())["seconds"])
    return out


def marker_span(destination: Path) -> tuple[float, float]:
    """(first step's start, last step's end), epoch seconds, from the markers (1 s resolution)."""
    import calendar

    starts, ends = [], []
    for path in glob.glob(str(destination / ".seamless" / "steps" / "*.json")):
        data = json.loads(Path(path).read_text())
        end = calendar.timegm(time.strptime(data["finished"], "%Y-%m-%dT%H:%M:%SZ")) + 0.5
        starts.append(end - float(data["seconds"]))
        ends.append(end)
    return min(starts), max(ends)


def tasks_of(path: Path) -> tuple[int, int]:
    from seamless_core.cli_workflow import load_project
    from seamless_core.plan import build_plan

    plan = build_plan(load_project(path, None))
    return len(plan.steps), len(plan.tasks)


def run_align(work: Path, source: str, sections: int, workers: int) -> dict:
    path = project(work, f"align_w{workers}", source, sections, "none")
    before = load()
    started = time.monotonic()
    subprocess.run([PY, "-m", "seamless_core", "align", str(path), "--workers", str(workers), "--no-report"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.monotonic() - started
    seconds = marker_seconds(work / f"align_w{workers}")
    steps, tasks = tasks_of(path)
    return {"runner": f"seamless align --workers {workers}", "fuse": "-", "steps": steps, "tasks": tasks,
            "wall": wall, "marker_sum": sum(seconds.values()), "per_step": seconds, "load": (before + load()) / 2}


def airflow_env(work: Path, path: Path) -> dict[str, str]:
    return {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
            "AIRFLOW_HOME": str(work / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "SEAMLESS_PROJECT": str(path), "SEAMLESS_EXECUTOR": "local",
            "PYTHONPATH": str(ROOT)}


def run_dags_test(work: Path, source: str, sections: int, fuse: str, warm_dir: Path | None) -> dict:
    """One `dags test` run; warm_dir: the warm step server's folder, None for a subprocess per task."""
    name = f"airflow_{fuse}" + ("" if warm_dir else "_cold")
    path = project(work, name, source, sections, fuse)
    env = airflow_env(work, path)
    env.update({"SEAMLESS_WARM_DIR": str(warm_dir)} if warm_dir else {"SEAMLESS_WARM": "0"})
    if not (work / "airflow" / "airflow.db").exists():
        subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True, text=True)
        subprocess.run(["airflow", "pools", "set", "seamless_gpu", "2", "GPU steps"], env=env, check=True,
                       capture_output=True, text=True)
    before = load()
    started, epoch = time.monotonic(), time.time()
    result = subprocess.run(["airflow", "dags", "test", "seamless_align"], env=env, capture_output=True, text=True,
                            cwd=work)
    wall = time.monotonic() - started
    first, last = marker_span(work / name)
    seconds = marker_seconds(work / name)
    steps, tasks = tasks_of(path)
    if result.returncode != 0 or len(seconds) != steps:
        raise SystemExit(f"airflow dags test ({fuse}) failed: {len(seconds)}/{steps} steps done\n"
                         f"{(result.stdout + result.stderr)[-3000:]}")
    runner = "local twin, warm step server" if warm_dir else "local twin, a subprocess per task (SEAMLESS_WARM=0)"
    return {"runner": f"airflow dags test, {runner}", "fuse": fuse, "steps": steps, "tasks": tasks, "wall": wall,
            "marker_sum": sum(seconds.values()), "per_step": seconds, "load": (before + load()) / 2,
            "head": first - epoch, "tail": epoch + wall - last, "between": last - first}


def process_start(work: Path, source: str, repeats: int = 3) -> float:
    """Wall time of `python -m seamless_core` importing what a step imports and doing nothing else."""
    code = "import seamless_core.cli, seamless_core.markers, seamless_core.volumes, torch"
    best = float("inf")
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run([PY, "-c", code], cwd=ROOT, check=True)
        best = min(best, time.monotonic() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", type=int, default=30)
    parser.add_argument("--fuse", default="none,pairs,block")
    parser.add_argument("--cold", default="block", help="fuse values also run with a subprocess per task ('' for none)")
    parser.add_argument("--work", type=Path, help="keep the layers here (default: a temporary folder, deleted)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="airflow-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    warm_dir = Path(tempfile.mkdtemp(prefix="aw-", dir="/tmp"))  # this benchmark's own warm step server
    try:
        source = build_sample(work, args.sections)
        start_cost = process_start(work, source)
        start_load = load()
        align = run_align(work, source, args.sections, 1)
        print(f"align: {align['wall']:.1f} s, step work {align['marker_sum']:.1f} s, load {align['load']:.1f}", flush=True)
        runs = []
        plan = [(fuse, warm_dir) for fuse in args.fuse.split(",") if fuse]
        plan += [(fuse, None) for fuse in args.cold.split(",") if fuse]
        for fuse, warm in plan:
            runs.append(run_dags_test(work, source, args.sections, fuse, warm))
            r = runs[-1]
            print(f"dags test fuse={fuse} ({r['runner']}): {r['tasks']} tasks, {r['wall']:.1f} s, load {r['load']:.1f}",
                  flush=True)
        text = render(args, align, runs, start_cost, start_load, time.monotonic() - started)
    finally:
        from seamless_core import warm

        warm.stop_servers(warm_dir)
        shutil.rmtree(warm_dir, ignore_errors=True)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    if args.out:
        write_section(args.out, "airflow-overhead", "End to end: Airflow overhead on the sample", text)
        save_results(f"airflow_overhead_{args.sections}", {
            "sections": args.sections,
            "runs": [{k: v for k, v in r.items() if k != "per_step"} for r in [align, *runs]],
            "process_start_s": start_cost})


def fit(runs: list[dict]) -> tuple[float, float] | None:
    """Least squares of (wall - step work) = fixed + per_task * tasks over the Airflow runs."""
    if len({r["tasks"] for r in runs}) < 2:
        return None
    xs = [r["tasks"] for r in runs]
    ys = [r["wall"] - r["marker_sum"] for r in runs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def render(args, align: dict, runs: list[dict], start_cost: float, start_load: float, total: float) -> str:
    mpx = 512 * 512 / 1e6
    rows = []
    for r in [align, *runs]:
        outside = r["wall"] - r["marker_sum"]
        if "between" in r:
            inside = (r["between"] - r["marker_sum"]) / r["between"]
            per_task = (r["between"] - r["marker_sum"]) / max(1, r["tasks"] - 1)
            edges = f"{r['head']:.0f} / {r['tail']:.0f}"
        else:
            inside, per_task, edges = outside / r["wall"], outside / r["tasks"], "-"
        rows.append(f"| {r['runner']} | {r['fuse']} | {r['steps']} / {r['tasks']} | {r['wall']:.0f} | "
                    f"{r['marker_sum']:.0f} | {r['wall'] / (args.sections * mpx):.1f} | **{outside / r['wall']:.0%}** | "
                    f"{edges} | **{inside:.0%}** | {per_task:.2f} | {r['load']:.1f} |")
    lines = [
        f"The sample workflow: {args.sections} sections of 512 x 512 px (the demo volume, `seamless demo --no-align`), "
        "the project of dags/seamless_project.example.yaml (stages `serial`, k = 3, blocks of 10), on this "
        "machine's CPU, one step at a time in both runners. Step work: the sum of the steps' own seconds in that "
        "run (their restart markers: opening the layers and processing the chunks; the child's interpreter start "
        "and its imports of torch and cloudvolume come before the marker's clock starts). Outside the step work: "
        "wall time minus that sum, i.e. Airflow (the `dags test` command's start and DAG parse, the metadata DB, "
        "the task runner) and each task's process start; for `seamless align`, the executor's start (a worker "
        "importing torch) and its dispatch.",
        "",
        "| runner | fuse | steps / tasks | wall s | step work s | s per Mpx per section | outside the step work, of wall | command start → first step / last step → exit, s | outside the step work between first step and last (a running Airflow) | s per task start | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"A bare child importing what a step imports (`python -c 'import seamless_core.cli, seamless_core.markers, "
        f"seamless_core.volumes, torch'`) takes {start_cost:.2f} s here (best of 3, load {start_load:.1f}).",
    ]
    fitted = fit([r for r in runs if "warm" in r["runner"]])
    if fitted is not None:
        fixed, per_task = fitted
        lines += ["", f"Fit over the warm `dags test` runs: wall - step work = {fixed:.1f} s + {per_task:.2f} s per task "
                  "(the fixed part is the `dags test` command: Airflow's imports, the DAG parse, the run's creation)."]
    best = min(runs, key=lambda r: 1 - r["marker_sum"] / r["wall"]) if runs else None
    lines += ["", "With the warm step server (the local twin's default, docs/dags.md) a task's step is a fork of a "
              "process that imported torch and the steps once; the first task of the first run also starts the "
              "server (its imports). `SEAMLESS_WARM=0` runs each step as a fresh `python -m seamless_core` child."]
    if best is not None:
        lines += ["", f"Lowest Airflow share: fuse `{best['fuse']}`, {1 - best['marker_sum'] / best['wall']:.0%} of wall "
                  f"time ({best['tasks']} tasks). Benchmark wall time {total:.0f} s. Command: `.venv/bin/python "
                  f"bench/airflow_overhead.py --sections {args.sections} --fuse {args.fuse} --cold '{args.cold}' --out docs/benchmarks.md`."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
