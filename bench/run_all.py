"""Run the benchmarks with one command and rewrite their sections of docs/benchmarks.md.

Quick mode (the default; about 10 minutes on 2 quiet cores, much longer on a loaded one):

* bench/steps.py: per-step Mpx/s against the limit measured in the same run (2048² section);
* bench/memory.py: peak host memory per step against the chunk size (2048² section, chunks 256..2048);
* bench/scheduler_throughput.py: task instances per second through `airflow standalone` (100 no-op tasks);
* bench/airflow_overhead.py: the sample workflow (10 sections) through `seamless align` and `airflow dags
  test` with fuse `block` and `pairs` (warm step server), and `block` with a subprocess per task;
* bench/dag_parse.py: parse time of a 1,000-section DAG (fuse none and block);
* bench/scaling.py: docs/scaling.md from the figures the others saved in bench/results/.

--full: 4096² sections, the 30-section sample with every fuse value, 500 scheduler tasks, the embedded
default's peak RSS, the parse of a 7,000-section DAG, bench/render_throughput.py. --with-quality also runs bench/estimators.py (residual
and seconds per estimator stack beside scikit-image TV-L1; it owns the `estimators` section).
--device cuda passes the device to the benchmarks that take one (steps, memory, render_throughput).

Each benchmark rewrites only its own marked section; a failing one is reported and the others still run.

Run: .venv/bin/python bench/run_all.py [--full] [--with-quality] [--device cuda] [--only steps,memory] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plan(full: bool, device: str, quality: bool) -> list[tuple[str, list[str]]]:
    size = "4096" if full else "2048"
    runs = [
        ("steps", ["steps.py", "--size", size, "--repeats", "3", "--iterations", "50", "--device", device]),
        ("memory", ["memory.py", "--size", size, "--chunks", "256,512,1024,2048", "--device", device]
         + (["--embedded"] if full else [])),
        ("scheduler", ["scheduler_throughput.py", "--tasks", "500" if full else "100", "--width", "10"]),
        ("airflow_overhead", ["airflow_overhead.py", "--sections", "30" if full else "10",
                              "--fuse", "none,pairs,block" if full else "block,pairs", "--cold", "block"]),
        ("dag_parse", ["dag_parse.py", "--fuse", "none,block"]),
    ]
    if full:
        runs.append(("dag_parse_7000", ["dag_parse.py", "--sections", "7000", "--fuse", "none,section,block",
                                        "--repeats", "1"]))
        runs.append(("render_throughput", ["render_throughput.py", "--device", device]))
    runs.append(("scaling", ["scaling.py"]))  # docs/scaling.md from bench/results/*.json
    if quality:
        runs.append(("estimators", ["estimators.py", "--device", device]))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--with-quality", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", help="comma-separated names: steps, memory, scheduler, airflow_overhead, dag_parse, ...")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    runs = plan(args.full, args.device, args.with_quality)
    if args.only:
        wanted = set(args.only.split(","))
        runs = [r for r in runs if r[0] in wanted]
    failed = []
    started = time.monotonic()
    for name, argv in runs:
        t0, load0 = time.monotonic(), os.getloadavg()[0]
        print(f"== {name}: {' '.join(argv)} (load {load0:.1f})", flush=True)
        out = [] if name == "scaling" else ["--out", str(args.out)]  # scaling.py writes docs/scaling.md
        code = subprocess.call([sys.executable, str(ROOT / "bench" / argv[0]), *argv[1:], *out], cwd=ROOT)
        print(f"== {name}: exit {code} after {time.monotonic() - t0:.0f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        if code:
            failed.append(name)
    print(f"all done in {time.monotonic() - started:.0f} s; {len(runs) - len(failed)} of {len(runs)} benchmarks refreshed "
          f"in {args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
