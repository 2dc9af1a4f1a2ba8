"""A warm step server for the local twin: torch and every step imported once, one fork per step.

A `python -m seamless_core` child pays ~3 s of imports (torch, cloud-volume) before its first chunk; on
the embedded default that was most of each Airflow task's wall time (docs/benchmarks.md). The local
twin's tasks hand their command line to this server instead. It forks a child that already has
everything imported, gives it the task's environment, working folder and output pipe, and reports the
child's exit code. The child behaves as a subprocess would: it runs in its own session, so on_kill's
killpg reaches it; its output goes straight into the task's pipe, so the step of a task that died gets
SIGPIPE as before; the exit codes are the same.

There is one server per user, interpreter, seamless_core source and start-up environment (PYTHON*,
LD_*: what shapes an interpreter before its first line). The socket's name hashes them, so an edited
or upgraded package, or a step with another PYTHONPATH, gets a fresh server. A server exits after `idle` seconds with no step
running. Any failure to reach or start a server returns None, and the caller starts a plain subprocess
instead.

Run: python -m seamless_core.warm --socket PATH [--idle SECONDS]   (the local twin starts it itself)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Mapping
from typing import IO, Any

log = logging.getLogger("seamless.warm")

WARM_ENV = "SEAMLESS_WARM"  # "0" turns the warm server off (a subprocess per step, as on a pod)
DIR_ENV = "SEAMLESS_WARM_DIR"
IDLE_ENV = "SEAMLESS_WARM_IDLE"
DEFAULT_IDLE_S = 600.0
START_TIMEOUT_S = 120.0
SERVER_LOST = -1  # the exit code reported when the server died before the step's own exit code came back
_MESSAGE = 1 << 20


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """On unless SEAMLESS_WARM (in `env`, the step's environment; else this process's) says 0/false/no/off."""
    value = (env if env is not None else os.environ).get(WARM_ENV, "1")
    return value.strip().lower() not in ("0", "false", "no", "off")


def _startup_env(env: Mapping[str, str]) -> str:
    """What shapes an interpreter before its first line (sitecustomize, paths, preloads): steps whose
    values differ get different servers, as they would get differently started subprocesses."""
    names = sorted(k for k in env if (k.startswith("PYTHON") and k != "PYTHONUNBUFFERED") or k.startswith("LD_"))
    return "\0".join(f"{k}={env[k]}" for k in names)


def socket_path(env: Mapping[str, str]) -> Path:
    """The socket of this interpreter, this source and `env`'s start-up settings, in a folder of this
    user's own under TMPDIR (so a step never writes outside TMPDIR and its destination)."""
    package = Path(__file__).resolve().parent
    newest = max(p.stat().st_mtime_ns for p in package.rglob("*.py"))
    key = hashlib.sha256(f"{sys.executable}\0{package}\0{newest}\0{_startup_env(env)}".encode()).hexdigest()[:12]
    base = env.get("TMPDIR") or tempfile.gettempdir()
    folder = Path(env.get(DIR_ENV) or os.path.join(base, f"seamless-warm-{os.getuid()}"))
    path = folder / f"{key}.sock"
    if len(os.fsencode(path)) > 100:  # a Unix socket's path is at most 107 bytes
        raise OSError(f"the warm step server's socket path is too long ({path}); set {DIR_ENV} to a short folder")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{folder} must be this user's own folder with mode 0700 (set {DIR_ENV})")
    return path


# --- the server ----------------------------------------------------------------------------------
def _preload() -> None:
    """Import what every step imports, without starting a thread pool (a fork after one would hang)."""
    import pkgutil

    import cloudvolume  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401

    import seamless_core

    for module in pkgutil.walk_packages(seamless_core.__path__, "seamless_core."):
        if module.name in ("seamless_core.__main__", "seamless_core.warm"):
            continue
        try:
            __import__(module.name)
        except ImportError as exc:  # an optional dependency: the step imports it itself when it runs
            log.info("not preloaded: %s (%s)", module.name, exc)


def _run_child(request: dict[str, Any], output: int) -> int:
    """In the forked child: become the step's process, run it, return its exit code."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server's own handler; the step installs its own
    os.setsid()  # its own process group: the task's on_kill signals the whole group, as with a subprocess
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [str(Path(__file__).with_name("__main__.py")), *request["argv"]]  # usage: `python -m seamless_core`
    import numpy

    numpy.random.seed()  # a fresh process would not share its seed with every other step
    from .cli import main

    return main(list(request["argv"]))


def _report_exit(conn: socket.socket, pid: int, done: threading.Semaphore, open_conns: set[socket.socket]) -> None:
    try:
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            conn.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
    finally:
        open_conns.discard(conn)
        conn.close()
        done.release()


def serve(path: Path, idle: float) -> None:
    """Accept step requests on `path` until `idle` seconds pass with no step running."""
    _preload()
    lock = open(f"{path}.lock", "a")  # noqa: SIM115 - held for the server's life: one server per socket
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another warm server holds {path}.lock") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))  # who to stop (tests, an operator who wants fresh code loaded now)
    lock.flush()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a dead server's socket
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(64)
    listener.settimeout(idle)
    running = 0
    open_conns: set[socket.socket] = set()  # the tasks still waiting for an exit code
    finished = threading.Semaphore(0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log.info("warm step server on %s (pid %d, idle exit after %.0f s)", path, os.getpid(), idle)
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                while finished.acquire(blocking=False):
                    running -= 1
                if running == 0:
                    return
                continue
            while finished.acquire(blocking=False):
                running -= 1
            try:
                conn.settimeout(10)
                data, fds, _, _ = socket.recv_fds(conn, _MESSAGE, 1)
                request = json.loads(data)
                if len(fds) != 1:
                    raise ValueError("a step request carries exactly one output pipe")
            except (OSError, ValueError) as exc:
                log.warning("refused a request: %s", exc)
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the step
                code = 1
                try:
                    for inherited in (listener, conn, *list(open_conns)):  # another task's socket held open here
                        inherited.close()  # would hide the server's death from that task
                    lock.close()  # the flock stays the server's: a new server may start once this one is gone
                    code = _run_child(request, fds[0])
                except SystemExit as exc:
                    code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001 - a bug: its traceback goes to the task log
                    import traceback

                    traceback.print_exc()
                finally:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(code)
            os.close(fds[0])  # only the step holds the pipe now: the task sees EOF when the step ends
            conn.settimeout(None)
            conn.send(json.dumps({"pid": pid}).encode())
            running += 1
            open_conns.add(conn)
            threading.Thread(target=_report_exit, args=(conn, pid, finished, open_conns), daemon=True).start()
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def server_pids(folder: Path) -> list[int]:
    """The servers running on sockets in `folder`: each holds the flock of its lock file, which names its pid."""
    pids = []
    for lock_path in folder.glob("*.sock.lock"):
        with open(lock_path) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held: its server runs (a free lock names a dead server's pid)
                text = lock.read().strip()
                if text.isdigit():
                    pids.append(int(text))
    return pids


def stop_servers(folder: Path) -> None:
    """SIGTERM the servers in `folder` (benchmarks and tests; or to load changed code before the idle exit)."""
    for pid in server_pids(folder):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


# --- the client ----------------------------------------------------------------------------------
class WarmProcess:
    """A step running in a warm server's child, with subprocess.Popen's pid, stdout, poll() and wait()."""

    def __init__(self, conn: socket.socket, pid: int, stdout: IO[str]) -> None:
        self._conn, self.pid, self.stdout = conn, pid, stdout
        self.returncode: int | None = None
        self._receiving = threading.Lock()  # on_kill waits from another thread than execute

    def _receive(self, timeout: float | None) -> None:
        """The exit code message (or EOF: the server died); TimeoutError/BlockingIOError if not yet."""
        if self.returncode is not None:
            return
        self._conn.settimeout(timeout)
        try:
            data = self._conn.recv(_MESSAGE)
        except (TimeoutError, BlockingIOError):
            raise
        except OSError:
            data = b""
        self.returncode = int(json.loads(data)["exit"]) if data else SERVER_LOST
        self._conn.close()

    def poll(self) -> int | None:
        if self.returncode is None and self._receiving.acquire(blocking=False):
            try:
                with contextlib.suppress(TimeoutError, BlockingIOError):
                    self._receive(0)
            finally:
                self._receiving.release()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        started = time.monotonic()
        if not self._receiving.acquire(timeout=-1 if timeout is None else timeout):
            raise subprocess.TimeoutExpired(["seamless", "(warm)"], timeout or 0)
        try:
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
            self._receive(left)
        except (TimeoutError, BlockingIOError):
            raise subprocess.TimeoutExpired(["seamless", "(warm)"], timeout or 0) from None
        finally:
            self._receiving.release()
        assert self.returncode is not None
        return self.returncode


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _start_server(path: Path, env: Mapping[str, str]) -> socket.socket | None:
    """Start a server for `path` (one at a time: a lock file) and connect once it listens."""
    with open(f"{path}.start", "w") as starting:
        fcntl.flock(starting, fcntl.LOCK_EX)  # a task starting at the same moment waits for this server
        conn = _connect(path)
        if conn is not None:
            return conn
        idle = env.get(IDLE_ENV) or str(DEFAULT_IDLE_S)
        with open(f"{path}.log", "ab") as server_log:
            server = subprocess.Popen(
                [sys.executable, "-m", "seamless_core.warm", "--socket", str(path), "--idle", idle],
                stdin=subprocess.DEVNULL, stdout=server_log, stderr=server_log, start_new_session=True,
                env=dict(env))  # the start-up settings its socket's name hashes
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and server.poll() is None:
            conn = _connect(path)
            if conn is not None:
                return conn
            time.sleep(0.1)
        return None


def popen(argv: list[str], env: dict[str, str]) -> WarmProcess | None:
    """Start `seamless ARGV` in a warm server's child (a server is started if none runs), or None."""
    try:
        path = socket_path(env)
        conn = _connect(path) or _start_server(path, env)
        if conn is None:
            log.warning("no warm step server came up at %s (its log: %s.log); starting a subprocess", path, path)
            return None
        read, write = os.pipe()
        try:
            request = {"argv": argv, "env": env, "cwd": os.getcwd()}
            socket.send_fds(conn, [json.dumps(request).encode()], [write])
        finally:
            os.close(write)
        conn.settimeout(30)
        try:
            reply = conn.recv(_MESSAGE)
        except OSError:
            reply = b""
        if not reply:
            os.close(read)
            conn.close()
            log.warning("the warm step server at %s did not start the step; starting a subprocess", path)
            return None
        return WarmProcess(conn, int(json.loads(reply)["pid"]), os.fdopen(read, "r", encoding="utf-8", errors="replace"))
    except OSError as exc:  # the warm path is an optimisation: any failure falls back to a subprocess
        log.warning("warm step server unavailable (%s); starting a subprocess", exc)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    parser.add_argument("--idle", type=float, default=DEFAULT_IDLE_S, help="exit after this many idle seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.socket, args.idle)


if __name__ == "__main__":
    main()
