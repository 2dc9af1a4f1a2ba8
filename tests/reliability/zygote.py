"""The fork server behind reliability.harness: imports seamless_core once, forks one child per job.

Protocol (one JSON request per stdin line, answered with lines on stdout):
  request  {"jobs": [{"argv": [...], "log": PATH, "start": S, "kill": null or {"after": T, "nth": K, "delay": D}},
                     ...]}
           a job starts S seconds into the batch; with "kill" it is SIGKILLed D seconds after the K-th
           traced event tagged T (T = "": after its fork)
  answers  "pid I PID T0"          job I forked at monotonic time T0
           "ev I TAG T"            job I is about to start (TAG+) or has finished (TAG-) a traced call
           "result I CODE SKIPPED" job I's command returned (just before it exits)
           "exit I CODE" / "killed I SIGNAL"
           "batch"                 every job of the request has been reaped
Each child runs its command line as the executor's workers do (cli.run_command, one torch thread) with
stdout and stderr in its log file, and reports on its own pipe, which the zygote relays: so the zygote
sees each event as it happens and can kill right after it. The zygote sends the SIGKILL and reaps the
child itself, so a kill never reaches a recycled pid; a child that ended first is reported as exited.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PROTO = os.dup(1)  # the pipe to the test
OUT = PROTO  # where this process reports: a child reports on its own pipe to the zygote
JOB = -1  # the job index of this process once forked (-1 in the zygote itself)


def say(line: str) -> None:
    """One write(2) per line: lines from children and their threads never interleave."""
    os.write(OUT, (line + "\n").encode())


SLOW_PAUSE_S = 0.001  # a slow disk: file writes inside traced calls go out in pieces, 1 ms apart
METADATA_PIECE = 64  # bytes per piece of an info or marker file (~1 KB: ~20 ms per file)
DATA_PIECES = 4  # pieces per chunk file (4-32 KB: a few ms per chunk)
_SLOW = threading.local()


def traced(tag: str, function: Callable[..., Any], piece: int = 0) -> Callable[..., Any]:
    """`function`, announcing each call's start and end on the pipe.

    Inside the call, the file writes of seamless_core.volumes (raw chunk files, info files, markers) go
    out in pieces with pauses (`piece` bytes each, 0: DATA_PIECES pieces per file), so a write lasts
    milliseconds instead of microseconds and a kill aimed inside it lands between a file's first and last
    byte: where a write in place would leave the file torn. The bytes written are unchanged.
    """

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if JOB < 0:
            return function(*args, **kwargs)
        say(f"ev {JOB} {tag}+ {time.monotonic():.6f}")
        _SLOW.piece = piece
        try:
            return function(*args, **kwargs)
        finally:
            _SLOW.piece = None
            say(f"ev {JOB} {tag}- {time.monotonic():.6f}")

    return wrapper


def install_tracing() -> None:
    """Chunk reads (R), chunk writes (W), info writes (I) and restart-marker writes (M)."""
    from seamless_core import markers, volumes

    volumes.Layer.read = traced("R", volumes.Layer.read)  # type: ignore[method-assign]
    volumes.Layer.write = traced("W", volumes.Layer.write)  # type: ignore[method-assign]
    volumes.Layer.commit_info = traced("I", volumes.Layer.commit_info, METADATA_PIECE)  # type: ignore[method-assign]
    markers.MarkedStep.finish = traced("M", markers.MarkedStep.finish, METADATA_PIECE)  # type: ignore[method-assign]
    write_all = volumes._write_all

    def slow_write_all(fd: int, view: memoryview) -> None:
        piece = getattr(_SLOW, "piece", None)
        if piece is None:
            return write_all(fd, view)
        size = piece or max(1, -(-len(view) // DATA_PIECES))
        for start in range(0, len(view), size):
            write_all(fd, view[start : start + size])
            time.sleep(SLOW_PAUSE_S)
        return None

    volumes._write_all = slow_write_all  # raw chunk writes and put_whole write through it


def child(job: int, request: dict[str, Any], report: int) -> None:
    global JOB, OUT
    JOB, OUT = job, report
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    import logging

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from seamless_core.cli import run_command

    sys.stderr.write(f"$ seamless {' '.join(request['argv'])}\n")
    code, skipped = run_command(list(request["argv"]))
    sys.stdout.flush()
    sys.stderr.flush()
    say(f"result {job} {code} {int(skipped)}")
    os._exit(code)


@dataclass
class Running:
    index: int
    pid: int
    fd: int  # the read end of its report pipe
    kill: dict[str, Any] | None
    seen: dict[str, int] = field(default_factory=dict)  # traced events so far, by tag
    kill_at: float | None = None  # armed: when to send it (math.inf once sent)
    buffer: bytes = b""


def fork(index: int, request: dict[str, Any]) -> Running:
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            child(index, request, write_end)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(99)
    os.close(write_end)
    say(f"pid {index} {pid} {started:.6f}")
    kill = request.get("kill")
    job = Running(index, pid, read_end, kill)
    if kill is not None and not kill["after"]:
        job.kill_at = started + float(kill["delay"])
    return job


def relay(job: Running, data: bytes) -> None:
    """Forward a child's lines; arm its kill when its chosen event goes by."""
    job.buffer += data
    *lines, job.buffer = job.buffer.split(b"\n")
    for line in lines:
        os.write(PROTO, line + b"\n")
        if not line.startswith(b"ev "):
            continue
        tag = line.split()[2].decode()
        job.seen[tag] = job.seen.get(tag, 0) + 1
        if job.kill is not None and job.kill_at is None and tag == job.kill["after"] \
                and job.seen[tag] == int(job.kill["nth"]):
            job.kill_at = time.monotonic() + float(job.kill["delay"])


def run_batch(jobs: list[dict[str, Any]]) -> None:
    """Fork every job at its start offset, SIGKILL those with a kill when it is due, reap them all."""
    begin = time.monotonic()
    waiting = sorted((float(j.get("start", 0.0)), i) for i, j in enumerate(jobs))
    running: dict[int, Running] = {}
    while waiting or running:
        now = time.monotonic()
        while waiting and begin + waiting[0][0] <= now:
            index = waiting.pop(0)[1]
            job = fork(index, jobs[index])
            running[job.fd] = job
        due = [begin + waiting[0][0]] if waiting else []
        due += [j.kill_at for j in running.values() if j.kill_at is not None and j.kill_at != math.inf]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        ready, _, _ = select.select(list(running), [], [], timeout)
        while ready:  # everything the children said so far, before any kill fires (see traced)
            for fd in ready:
                data = os.read(fd, 1 << 16)
                if data:
                    relay(running[fd], data)
                    continue
                job = running.pop(fd)  # end of file: the child is gone (exited or killed)
                os.close(fd)
                _, status = os.waitpid(job.pid, 0)
                if os.WIFSIGNALED(status):
                    say(f"killed {job.index} {os.WTERMSIG(status)}")
                else:
                    say(f"exit {job.index} {os.WEXITSTATUS(status)}")
            ready, _, _ = select.select(list(running), [], [], 0)
        now = time.monotonic()
        for job in running.values():
            if job.kill_at is not None and job.kill_at <= now:
                os.kill(job.pid, signal.SIGKILL)  # an exited, unreaped child is a zombie: harmless
                job.kill_at = math.inf
    say("batch")


def main() -> None:
    import seamless_core.cli  # noqa: F401  (every subcommand; torch, cloud-volume)
    from seamless_core.steps import compose, compute_field, copy, cpc, downsample, render, vector_vote  # noqa: F401

    install_tracing()
    say("ready")
    for line in sys.stdin:
        run_batch(json.loads(line)["jobs"])


if __name__ == "__main__":
    main()
