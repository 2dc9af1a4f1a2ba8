"""The local executor: run a plan's steps in dependency order on a pool of worker processes.

Each worker imports torch once and runs `seamless` command lines in-process (a subprocess per step
would pay ~2 s of imports each time), with the same restart-marker wrapper the Airflow tasks use, so a
rerun skips every step whose marker matches its inputs. Each step's log goes to its own file; the
console gets one line per step and, on failure, the tail of the failing step's log.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ExitCode, SeamlessError
from .markers import delete_marker, read_marker
from .plan import Plan, Step

log = logging.getLogger("seamless.align")


@dataclass
class ExecutionSummary:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_started: int = 0
    seconds: float = 0.0
    exit_code: int = 0


class StepFailed(SeamlessError):
    """A step of the plan failed; its own exit code (bad input, storage) is kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(exit_code) if exit_code in ExitCode._value2member_map_ else ExitCode.INTERNAL


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    from . import cli  # noqa: F401  (imports every step once per worker)


def _run_in_worker(argv: list[str], log_path: str) -> tuple[int, bool, float]:
    """Run one command line with its logging and stdout captured in `log_path`."""
    from .cli import run_command

    started = time.monotonic()
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with open(log_path, "a", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        previous = root.handlers[:]
        root.handlers = [handler]
        root.setLevel(logging.INFO)
        stream.write(f"$ seamless {' '.join(argv)}\n")
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                code, skipped = run_command(argv)
        finally:
            root.handlers = previous
    return code, skipped, time.monotonic() - started


def log_folder(plan: Plan) -> Path:
    """Step logs beside the outputs for a local destination, else in ./seamless-logs."""
    dst = plan.layout.destination
    if dst.startswith("file://"):
        return Path(dst.removeprefix("file://")) / ".seamless" / "logs"
    return Path.cwd() / "seamless-logs"


def forget(plan: Plan, steps: list[Step]) -> int:
    """Delete the markers of `steps` (--force): they and everything after them run again."""
    count = 0
    for step in steps:
        url = plan.layout.marker(step.id)
        if read_marker(url) is not None:
            delete_marker(url)
            count += 1
    return count


def destination_lock(plan: Plan) -> contextlib.AbstractContextManager[None]:
    """One `seamless align` at a time per local destination, and none beside an Airflow run's steps.

    An exclusive flock on <destination>/.seamless/lock (seamless_core.locks): a second run is refused,
    not interleaved; the kernel drops the lock when the holder dies (even kill -9), so there is never a
    stale lock to clear by hand. Remote destinations (gs://, s3://) have no such lock; there Airflow's
    max_active_runs=1 serialises runs (docs/workflow.md).
    """
    from .locks import exclusive

    return exclusive(plan.layout.destination)


def execute(plan: Plan, *, workers: int = 1, force: bool = False) -> ExecutionSummary:
    """Run every step of `plan` whose marker is missing or stale, holding the destination's lock."""
    with destination_lock(plan):
        return _execute(plan, workers=workers, force=force)


def _execute(plan: Plan, *, workers: int, force: bool) -> ExecutionSummary:
    """Dispatch in dependency order, longest chain first; stop dispatching at the first failure."""
    summary = ExecutionSummary()
    started = time.monotonic()
    if force:
        log.info("--force: forgot %d finished steps", forget(plan, list(plan.steps)))
    logs = log_folder(plan)
    remaining = {s.id: set(s.deps) for s in plan.steps}
    dependants: dict[str, list[str]] = {s.id: [] for s in plan.steps}
    for s in plan.steps:
        for dep in s.deps:
            dependants[dep].append(s.id)
    priority = plan.priorities()
    ready: list[tuple[int, int, str]] = []  # heap: longest remaining chain first, then plan order
    order = {s.id: i for i, s in enumerate(plan.steps)}
    for s in plan.steps:
        if not s.deps:
            heapq.heappush(ready, (-priority[s.id], order[s.id], s.id))
    running: dict[Future[tuple[int, bool, float]], Step] = {}
    total = len(plan.steps)
    threads = max(1, (len(os.sched_getaffinity(0)) + workers - 1) // workers)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        while ready or running:
            while ready and len(running) < workers and not summary.failed:
                step = plan.by_id[heapq.heappop(ready)[2]]
                running[pool.submit(_run_in_worker, plan.argv(step), str(logs / f"{step.id}.log"))] = step
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                step = running.pop(future)
                try:
                    code, skipped, seconds = future.result()
                except BrokenProcessPool:
                    raise StepFailed(f"a worker process died while running step {step.id} (killed, or out of "
                                     "memory?); rerun: finished steps are kept", int(ExitCode.INTERNAL)) from None
                position = len(summary.ran) + len(summary.skipped) + len(summary.failed) + 1
                if code != 0:
                    summary.failed.append(step.id)
                    summary.exit_code = summary.exit_code or code
                    log.error("[%d/%d] FAILED %s (%s), exit %d; its log, %s, ends:\n%s", position, total, step.id,
                              step.label, code, logs / f"{step.id}.log", _tail(logs / f"{step.id}.log"))
                    continue
                (summary.skipped if skipped else summary.ran).append(step.id)
                log.info("[%d/%d] %s %s (%s) %.1f s", position, total, "skipped" if skipped else "done",
                         step.id, step.label, seconds)
                for child in dependants[step.id]:
                    remaining[child].discard(step.id)
                    if not remaining[child]:
                        heapq.heappush(ready, (-priority[child], order[child], child))
    summary.not_started = total - len(summary.ran) - len(summary.skipped) - len(summary.failed)
    summary.seconds = time.monotonic() - started
    return summary


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text().splitlines()[-lines:])
    except OSError:
        return "    (no log)"
