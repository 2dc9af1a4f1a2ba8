"""The warm step server (seamless_core.warm): real `seamless` steps forked from a server that has torch
imported, run through the local twin's operator exactly as Airflow runs them."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from operators.local import SeamlessLocalOperator
from seamless_core import warm
from seamless_core.geometry import BBox
from seamless_core.volumes import LayerKind, create_from_info, make_image_info

from test_dags import _capture, recorder  # noqa: F401  (recorder: the operator's task log, a fixture)


@pytest.fixture
def warm_dir(monkeypatch):
    """A server of this test's own (a short folder: a Unix socket's path has at most 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))
    monkeypatch.setenv(warm.DIR_ENV, str(folder))
    yield folder
    warm.stop_servers(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _layer(path: Path) -> None:
    info = make_image_info(dtype="uint8", resolution=(4, 4, 50), size=(64, 64, 2), chunk_xy=64, max_mip=1,
                           kind=LayerKind.IMAGE)
    layer = create_from_info(str(path), info, LayerKind.IMAGE)
    layer.write(BBox((0, 0, 0), (64, 64, 2)), np.full((2, 1, 64, 64), 7, np.uint8))


def _server_pid(folder: Path) -> int:
    (pid,) = warm.server_pids(folder)
    return pid


def _serving_step(tmp_path: Path, recorder) -> tuple[SeamlessLocalOperator, threading.Thread, list[BaseException]]:
    """A task running `seamless serve` (a step that runs until stopped) through the warm server, once it serves."""
    op = SeamlessLocalOperator(task_id="serve", step=["serve", str(tmp_path), "--port", "0"], warm=True)  # any free port
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(op, errors))
    thread.start()
    deadline = time.monotonic() + 60
    while not any(line.startswith("serving ") for line in recorder.lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    return op, thread, errors


def test_steps_run_in_a_warm_server_with_the_tasks_folder_and_output(tmp_path, warm_dir, recorder, monkeypatch) -> None:
    _layer(tmp_path / "img")
    monkeypatch.chdir(tmp_path)  # a relative layer path resolves in the task's folder, not the server's
    SeamlessLocalOperator(task_id="info", step=["info", "file://img"]).execute({})
    running = next(i for i, line in enumerate(recorder.lines) if line.startswith("running (warm step server"))
    assert "-m seamless_core info" in recorder.lines[running]
    assert any('"type": "image"' in line for line in recorder.lines[running + 1:])  # the step's output, line by line
    server = _server_pid(warm_dir)

    started = time.monotonic()
    SeamlessLocalOperator(task_id="again", step=["info", "file://img"]).execute({})
    second = time.monotonic() - started
    assert _server_pid(warm_dir) == server  # the same server, torch imported once
    print(f"second step through the warm server: {second:.2f} s")


def test_exit_codes_and_the_tasks_environment_reach_the_operator(tmp_path, warm_dir, recorder, monkeypatch) -> None:
    op = SeamlessLocalOperator(task_id="missing", step=["info", str(tmp_path / "nothere")], warm=True)
    with pytest.raises(AirflowFailException, match=r"seamless info exited with code 3 \(bad input\): .*no layer"):
        op.execute({})
    assert any(line.startswith("running (warm step server") for line in recorder.lines)

    _layer(tmp_path / "img")  # the progress interval is read from the task's environment, not the server's
    env = {"SEAMLESS_PROGRESS_INTERVAL": "not-a-number"}
    op = SeamlessLocalOperator(task_id="env", step=["downsample", "--src", str(tmp_path / "img"), "--dst-mip", "1"],
                               env=env, warm=True)
    with pytest.raises(AirflowException, match=r"exited with code 1 \(internal error\)"):
        op.execute({})
    assert any("not-a-number" in line for line in recorder.lines)


def test_on_kill_stops_a_warm_step_which_exits_130(tmp_path, warm_dir, recorder) -> None:
    op, thread, errors = _serving_step(tmp_path, recorder)
    op.on_kill()
    thread.join(30)
    assert not thread.is_alive()
    assert errors and "exited with code 130 (interrupted)" in str(errors[0]), recorder.lines[-5:]
    assert any("stopped by SIGTERM" in line for line in recorder.lines)


def test_a_server_that_dies_mid_step_fails_the_task_for_a_retry(tmp_path, warm_dir, recorder) -> None:
    op, thread, errors = _serving_step(tmp_path, recorder)
    os.kill(_server_pid(warm_dir), signal.SIGKILL)
    step = op._proc
    assert step is not None
    deadline = time.monotonic() + 10
    while step.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert step.poll() == warm.SERVER_LOST
    os.killpg(step.pid, signal.SIGTERM)  # the orphaned step, as on_kill would
    thread.join(30)
    assert errors and "warm step server died" in str(errors[0])
    assert not isinstance(errors[0], AirflowFailException)  # retried


def test_an_unusable_warm_folder_falls_back_to_a_subprocess(tmp_path, recorder, monkeypatch, caplog) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # others could plant a socket there: refused, the step runs as a subprocess
    monkeypatch.setenv(warm.DIR_ENV, str(shared))
    _layer(tmp_path / "img")
    SeamlessLocalOperator(task_id="info", step=["info", str(tmp_path / "img")]).execute({})
    assert any(line.startswith("running: ") for line in recorder.lines)
    assert "must be this user's own folder" in caplog.text  # logger seamless.warm: the task log, under Airflow


def test_off_switch(tmp_path, recorder, monkeypatch) -> None:
    monkeypatch.setenv(warm.WARM_ENV, "0")
    _layer(tmp_path / "img")
    SeamlessLocalOperator(task_id="info", step=["info", str(tmp_path / "img")]).execute({})
    assert any(line.startswith("running: ") for line in recorder.lines)



def test_a_step_with_other_start_up_settings_gets_its_own_server(warm_dir) -> None:
    """PYTHONPATH (a sitecustomize, another checkout) shapes the interpreter before its first line: a
    server started under one must not run steps that asked for another."""
    tmp_path = warm_dir  # a short folder: pytest's own may be too long for a socket path
    base = {"TMPDIR": str(tmp_path), "PATH": "/usr/bin"}
    path = warm.socket_path(base)
    assert path.parent == tmp_path / f"seamless-warm-{os.getuid()}" and path.parent.stat().st_mode & 0o777 == 0o700
    assert warm.socket_path({**base, "SEAMLESS_TILE": "x", "AWS_SECRET_ACCESS_KEY": "y"}) == path  # the child's own
    assert warm.socket_path({**base, "PYTHONPATH": "/elsewhere"}) != path
    assert warm.socket_path({**base, "LD_PRELOAD": "libfault.so"}) != path
    with pytest.raises(OSError, match="too long"):
        warm.socket_path({**base, "TMPDIR": str(tmp_path / ("x" * 90))})
