"""Run `seamless` command lines in real child processes and SIGKILL them on cue, cheaply.

Why a fork server (reliability/zygote.py): a Python start with torch costs ~2 s, a fork of a process
that imported seamless_core once costs milliseconds, so a hundred kill-and-rerun rounds fit in well
under a minute on 2 cores. Each child is a real process running the step exactly as the executor's
workers do; SIGKILL leaves what the kernel leaves (no finally blocks, no atexit, no flush).

Children announce each chunk read and write, info write and marker write on the pipe (the calls go
through unchanged; info and marker files are written in small pieces, see zygote.traced, so a kill can
land inside them), so every kill is placed in a phase of the step.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHASES = ("setup", "read", "compute", "write", "info", "marker", "done", "exit")


@dataclass(frozen=True)
class Kill:
    """SIGKILL `delay` s after the `nth` traced event tagged `after` (R+, R-, W+, W-; "": the fork)."""

    after: str
    nth: int
    delay: float


@dataclass
class Job:
    argv: list[str]
    log: Path
    start: float = 0.0  # seconds after the batch begins
    kill: Kill | None = None


@dataclass
class Outcome:
    """What became of one job."""

    argv: list[str]
    killed: bool = False
    code: int | None = None  # the exit status when not killed
    skipped: bool | None = None  # the restart marker said the step was done (None: no result line)
    forked_at: float = 0.0
    ended_at: float = 0.0
    events: list[tuple[str, float]] = field(default_factory=list)  # (tag, seconds after the fork)

    @property
    def seconds(self) -> float:
        return self.ended_at - self.forked_at

    @property
    def phase(self) -> str:
        """Where the process was when it ended: for a killed job, the phase the kill landed in."""
        if self.code is not None or self.skipped is not None:
            return "exit"
        return phase_after([tag for tag, _ in self.events])

    def stretches(self) -> list[tuple[Kill, float, str]]:
        """Where a kill can land in a finished job: after each traced event (chunk read or write, info or
        marker write), a Kill at the stretch's start (delay 0), the stretch's length and its phase."""
        tags = [tag for tag, _ in self.events]
        times = [at for _, at in self.events] + [max(self.seconds, self.events[-1][1] if self.events else 0.0)]
        seen: dict[str, int] = {}
        found = []
        for n, tag in enumerate(tags):
            seen[tag] = seen.get(tag, 0) + 1
            if tag[0] in "RWIM":
                found.append((Kill(tag, seen[tag], 0.0), times[n + 1] - times[n], phase_after(tags[: n + 1])))
        return found

    @property
    def setup_seconds(self) -> float:
        """From the fork to the first chunk read or write: argument parsing, opening and creating layers."""
        return next((at for tag, at in self.events if tag[0] in "RW"), self.seconds)


def phase_after(tags: list[str]) -> str:
    """The phase a step is in after these traced events: metadata writes, then data I/O in flight, win
    over compute; "done" once its marker is written (only the exit is left)."""
    reads = writes = infos = markers = 0
    data_any = False
    for tag in tags:
        step = 1 if tag.endswith("+") else -1
        if tag[0] == "R":
            reads += step
            data_any = True
        elif tag[0] == "W":
            writes += step
            data_any = True
        elif tag[0] == "I":
            infos += step
        elif tag[0] == "M":
            markers += step
            if tag == "M-":
                return "done"
    if markers > 0:
        return "marker"
    if infos > 0:
        return "info"
    if writes > 0:
        return "write"
    if reads > 0:
        return "read"
    return "compute" if data_any else "setup"


class Zygote:
    """The fork server process and a thread turning its stdout into a queue of lines."""

    def __init__(self) -> None:
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=python_path, OMP_NUM_THREADS="1")
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zygote.py"))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env, cwd=REPO)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._expect("ready", timeout=120)

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put("eof")

    def _expect(self, tag: str, timeout: float) -> str:
        line = self._next(timeout)
        if not line.startswith(tag):
            raise AssertionError(f"zygote said {line!r}, expected {tag!r}")
        return line

    def _next(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the zygote said nothing for {timeout} s") from None
        if line == "eof":
            stderr = self.process.stderr.read() if self.process.stderr else ""
            raise AssertionError(f"the zygote died: {stderr[-3000:]}")
        return line

    def run(self, jobs: list[Job], timeout: float = 120.0) -> list[Outcome]:
        """Run one batch of jobs (at once, each from its start offset); returns when all are reaped."""
        assert self.process.stdin is not None
        request = {"jobs": [{"argv": j.argv, "log": str(j.log), "start": j.start,
                             "kill": None if j.kill is None else vars(j.kill)}
                            for j in jobs]}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        outcomes = [Outcome(list(j.argv)) for j in jobs]
        while True:
            line = self._next(timeout)
            if line == "batch":
                return outcomes
            words = line.split()
            kind, index = words[0], int(words[1])
            outcome = outcomes[index]
            if kind == "pid":
                outcome.forked_at = float(words[3])
            elif kind == "ev":
                outcome.events.append((words[2], float(words[3]) - outcome.forked_at))
            elif kind == "result":
                outcome.skipped = words[3] == "1"
            elif kind == "exit":
                outcome.code = int(words[2])
                outcome.ended_at = time.monotonic()
            elif kind == "killed":
                outcome.killed = True
                outcome.ended_at = time.monotonic()

    def run_one(self, argv: list[str], log: Path, kill: Kill | None = None) -> Outcome:
        return self.run([Job(argv, log, kill=kill)])[0]

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def zygote() -> Iterator[Zygote]:
    server = Zygote()
    try:
        yield server
    finally:
        server.close()
