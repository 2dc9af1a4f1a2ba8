"""DAG parse time of `seamless_align` for a large section range (target: < 2 s for 1,000 sections).

Parses the DAG file with Airflow's DagBag for a project of N sections (block 10, default stages), in
this process after a warm-up parse (Airflow and seamless_core imported) and in a fresh process (all
imports included), best of --repeats.

Run: .venv/bin/python bench/dag_parse.py [--sections 1000] [--repeats 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import save_results, write_section  # noqa: E402


def project(folder: Path, sections: int, fuse: str = "none") -> Path:
    path = folder / f"project_{sections}_{fuse}.yaml"
    path.write_text(yaml.safe_dump({"source": "file:///nowhere/stack", "destination": str(folder / "out"),
                                    "sections": {"start": 0, "stop": sections}, "blocks": {"size": 10}, "fuse": fuse}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fuse", default="none", help="none, section, block or several, comma-separated")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="dag-parse-"))
    os.environ.setdefault("AIRFLOW_HOME", str(folder / "airflow"))
    os.environ["SEAMLESS_EXECUTOR"] = "local"
    from airflow.dag_processing.dagbag import DagBag

    os.environ["SEAMLESS_PROJECT"] = str(project(folder, 12))
    DagBag(dag_folder=str(ROOT / "dags"))  # warm-up: imports
    rows, saved = [], {}
    code = ("import time; t = time.perf_counter(); from airflow.dag_processing.dagbag import DagBag; "
            f"DagBag(dag_folder={str(ROOT / 'dags')!r}); print(time.perf_counter() - t)")
    for fuse in args.fuse.split(","):
        os.environ["SEAMLESS_PROJECT"] = str(project(folder, args.sections, fuse))
        warm, tasks = [], 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            bag = DagBag(dag_folder=str(ROOT / "dags"))
            warm.append(time.perf_counter() - started)
            tasks = len(bag.dags["seamless_align"].tasks)
        cold = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env=dict(os.environ)).stdout.strip().splitlines()[-1]) for _ in range(args.repeats)]
        load = os.getloadavg()[0]
        rows.append(f"| {args.sections} | {fuse} | {tasks} | {min(warm):.2f} s | {min(cold):.2f} s | {load:.1f} |")
        saved[fuse] = {"tasks": tasks, "warm_s": min(warm), "cold_s": min(cold), "load": load}
    text = (f"| sections | fuse | tasks | parse, imports warm (best of {args.repeats}) | fresh process incl. imports | load avg |\n"
            f"|---:|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
            f"Target: < 2 s for 1,000 sections. Command: `.venv/bin/python bench/dag_parse.py --sections {args.sections} "
            f"--fuse {args.fuse} --out docs/benchmarks.md`.")
    print(text)
    if args.out:
        name = "dag-parse" if args.sections == 1000 else f"dag-parse-{args.sections}"
        write_section(args.out, name, f"DAG parse time, {args.sections} sections", text)
        save_results(f"dag_parse_{args.sections}", {"sections": args.sections, "fuse": saved})


if __name__ == "__main__":
    main()
