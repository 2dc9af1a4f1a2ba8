"""One run at a time per destination: `seamless align` holds it alone, the steps of an Airflow run share it.

Two runs writing the same destination over overlapping sections (another section range, another
config, a hand-started `seamless align` next to a DAG run) would interleave their layers and restart
markers into a volume that neither run describes. So every writer of a local destination takes an flock
on `<destination>/.seamless/lock` for as long as it writes:

* `seamless align` (the local executor) takes it **exclusively**, writes its pid, host and start time
  into the file, and clears them when it ends;
* a plan step started on its own with its restart-marker options (`seamless --marker URL ... STEP`: the
  command every Airflow task runs, local twin or pod) takes it **shared**: the tasks of a DAG run run side
  by side, but never next to a `seamless align`.

Whoever comes second is refused at once (exit 3) with a message naming the holder; nothing waits, and
nothing is interleaved. The kernel drops an flock when its holder dies (kill -9 included), so a lock is
never stale: there is nothing to clear by hand. The file may still name a dead holder; it is only shown.

Local (file://) destinations only. gs:// and s3:// offer no lock that a killed pod releases; there the
`seamless_align` DAG's `max_active_runs=1` serialises DAG runs, and keeping a hand-started `seamless
align` off a destination an Airflow run writes is the operator's job (docs/workflow.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import InputError

LOCK_NAME = "lock"
MARKERS = "/.seamless/steps/"  # plan.Layout.markers: <destination>/.seamless/steps/<step id>.json


def lock_path(destination: str) -> Path | None:
    """The lock file of a local destination; None for remote ones (no lock there)."""
    if not destination.startswith("file://"):
        return None
    return Path(destination.removeprefix("file://")) / ".seamless" / LOCK_NAME


def destination_of_marker(marker: str) -> str | None:
    """The destination a plan step writes, from its marker URL; None for a marker outside that layout."""
    head, sep, _ = marker.rpartition(MARKERS)
    return head if sep and head else None


def _open(path: Path) -> IO[str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+")
    except OSError as exc:
        raise InputError(f"cannot open the destination's lock file {path}: {exc.strerror or exc}; "
                         "the destination folder must be writable") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(handle: IO[str], destination: str) -> str:
    """Who is writing, as far as the file says: the `seamless align` recorded in it if it still lives, else
    the steps of an Airflow run (shared holders write nothing)."""
    handle.seek(0)
    text = handle.read().strip()
    try:
        data = json.loads(text) if text else None
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and (data.get("host") != socket.gethostname() or _alive(int(data.get("pid") or 0))):
        return f"another `seamless align` is writing into {destination} ({text})"
    return f"the steps of another run (`seamless --marker ...`: Airflow tasks) are writing into {destination}"


@contextlib.contextmanager
def exclusive(destination: str) -> Iterator[None]:
    """`seamless align`: the destination to itself while the block runs, or an InputError naming the holder."""
    import fcntl

    path = lock_path(destination)
    if path is None:
        yield
        return
    with _open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{_holder(handle, destination)}; wait for it to finish or choose "
                             "another destination: two runs would interleave their sections (the lock is released "
                             "when its holder exits, even when killed)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def shared(destination: str) -> Iterator[None]:
    """A plan step run on its own: alongside other steps, never alongside a `seamless align`."""
    import fcntl

    path = lock_path(destination)
    if path is None:
        yield
        return
    with _open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{_holder(handle, destination)}; this step was refused so the two "
                             "runs do not interleave. Let that run finish, then run this step again (in Airflow: "
                             "clear the task); the lock is released when its holder exits, even when killed") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def step_lock(argv: list[str]) -> contextlib.AbstractContextManager[None]:
    """The shared lock for a command line with restart-marker options; nothing for anything else."""
    if "--marker" in argv[:-1] and argv and argv[0] in ("--marker", "--upstream"):
        destination = destination_of_marker(argv[argv.index("--marker") + 1])
        if destination is not None:
            return shared(destination)
    return contextlib.nullcontext()
