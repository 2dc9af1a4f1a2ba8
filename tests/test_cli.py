"""The `seamless` command: clear errors with meaningful exit codes, nothing written on refusal, progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seamless_core.cli import main
from seamless_core.errors import ExitCode
from seamless_core.synthetic import affine_field
from seamless_core.volumes import LayerKind

from conftest import sample_section
from test_steps import make_layer


@pytest.fixture
def layers(tmp_path: Path) -> Path:
    stack = np.stack([sample_section(z)[:256, :256] for z in range(2)])[:, None]
    make_layer(tmp_path / "img", stack, max_mip=2)
    field = np.concatenate([affine_field(256, 256, translation=(4.0, -3.0)).numpy()] * 2)
    make_layer(tmp_path / "field", field, LayerKind.FIELD, max_mip=2)
    return tmp_path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def render_args(root: Path, **overrides: str) -> list[str]:
    opts = {"--src": str(root / "img"), "--field": str(root / "field"), "--dst": str(root / "out")}
    opts.update(overrides)
    args = ["render"]
    for key, value in opts.items():
        args += [key, value]
    return args


def test_render_succeeds_and_reports_json(layers: Path, capsys) -> None:
    code, out, _ = run_cli(render_args(layers, **{"--report-json": str(layers / "r.json")}), capsys)
    assert code == ExitCode.OK
    report = json.loads(out.strip().splitlines()[-1])
    assert report["step"] == "render" and report["chunks"] == 2 and report["megapixels"] > 0.1
    assert json.loads((layers / "r.json").read_text()) == report


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"--src": "MISSING"}, r"--src: no layer at file://.*missing \(its info file is missing\)"),
        ({"--src": "FIELD"}, r"--src: .* has data type float32, but a image layer must be uint8 or float32|channels"),
        ({"--field": "IMG"}, r"--field: .* has data type uint8, but a field layer must be float32"),
        ({"--field": "RGB"}, r"--field: .* has 3 channels, but a field layer has 2"),
        ({"--field": "NOCONV"}, r"does not declare the field convention .*`seamless convert-field --from corgie"),
        ({"--field": "COARSE"}, r"resolution mismatch"),
        ({"--bbox": "0,0,0:300,256,1"}, r"outside .* bounds"),
        ({"--z": "1:5"}, r"outside .* bounds"),
        ({"--z": "3:1"}, r"empty or reversed"),
        ({"--device": "tpu"}, r"unknown device 'tpu': use cpu, cuda, cuda:N or auto"),
        ({"--dst": "ftp://host/x"}, r"unsupported storage scheme 'ftp'"),
        ({"--chunk": "100"}, r"--chunk 100 must be a positive multiple of the destination's storage chunk 128"),
        ({"--mip": "7"}, r"has no MIP 7"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message_and_nothing_written(
    layers: Path, capsys, overrides: dict[str, str], message: str
) -> None:
    make_layer(layers / "rgb", np.zeros((2, 3, 256, 256), np.float32), LayerKind.FIELD, convention=False)
    make_layer(layers / "noconv", np.zeros((2, 2, 256, 256), np.float32), LayerKind.FIELD, convention=False)
    make_layer(layers / "coarse", np.zeros((2, 2, 256, 256), np.float32), LayerKind.FIELD, resolution=(8, 8, 50))
    names = {"MISSING": "missing", "FIELD": "field", "IMG": "img", "RGB": "rgb", "NOCONV": "noconv", "COARSE": "coarse"}
    resolved = {k: str(layers / names[v]) if v in names else v for k, v in overrides.items()}
    code, _, err = run_cli(render_args(layers, **resolved), capsys)
    assert code == ExitCode.INVALID_INPUT, err
    assert err.startswith("error: ") and "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not (layers / "out").exists()  # validation comes before any write, the info file included


@pytest.mark.parametrize(
    "args",
    [
        ["render", "--field", "{root}/field", "--dst", "{root}/out", "--z", "1:2"],
        ["copy", "--dst", "{root}/out", "--bbox", "0,0,0:128,128,1"],
        ["cpc", "--dst", "{root}/out", "--mip", "0", "--patch", "32", "--z", "1:2"],
        ["downsample", "--mip", "0", "--dst-mip", "1", "--z", "0:1"],
    ],
    ids=["render", "copy", "cpc", "downsample"],
)
def test_a_step_given_a_region_reads_its_source_info_once(layers: Path, capsys, monkeypatch, args: list[str]) -> None:
    """--bbox/--z are resolved against the source the step opens anyway, not a second open of it.

    A spy wraps the real info reader (nothing is replaced) and counts the reads of the source's info."""
    from seamless_core import volumes

    real, source, reads = volumes._fetch_info, volumes.normalise_path(str(layers / "img")), []

    def counting(path: str):
        reads.extend([path] if path == source else [])
        return real(path)

    monkeypatch.setattr(volumes, "_fetch_info", counting)
    argv = [a.format(root=layers) for a in args[:1]] + ["--src", str(layers / "img")] + [a.format(root=layers) for a in args[1:]]
    code, _, err = run_cli(argv, capsys)
    assert code == ExitCode.OK, err
    assert len(reads) == 1, reads


def test_a_malformed_region_is_refused_before_the_source_is_read(layers: Path, capsys, monkeypatch) -> None:
    from seamless_core import volumes

    def no_reads(path: str):
        raise AssertionError(f"read {path} before refusing the option")

    monkeypatch.setattr(volumes, "_fetch_info", no_reads)
    code, _, err = run_cli(render_args(layers, **{"--z": "3:x"}), capsys)
    assert code == ExitCode.INVALID_INPUT and "--z" in err, err


def test_cuda_requested_without_a_gpu_is_refused(layers: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for machines without one")
    code, _, err = run_cli(render_args(layers, **{"--device": "cuda"}), capsys)
    assert code == ExitCode.INVALID_INPUT and "sees no CUDA device" in err
    assert not (layers / "out").exists()


def test_usage_errors_exit_2(capsys) -> None:
    code, _, err = run_cli(["render", "--src", "x"], capsys)
    assert code == ExitCode.USAGE and "Missing option" in err and "--field" in err


def test_existing_incompatible_destination_is_refused(layers: Path, capsys) -> None:
    make_layer(layers / "out", np.zeros((2, 1, 128, 128), np.uint8))
    code, _, err = run_cli(render_args(layers), capsys)
    assert code == ExitCode.INVALID_INPUT and "already exists and differs" in err


def test_progress_lines_in_a_log_file(layers: Path, tmp_path: Path) -> None:
    """Not a terminal (an Airflow task log): periodic lines with chunks, rate, Mpx/s and ETA."""
    env = dict(os.environ, SEAMLESS_PROGRESS_INTERVAL="0")
    result = subprocess.run(
        [sys.executable, "-m", "seamless_core", *render_args(layers), "--chunk", "128"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "render: 1/8 chunks (12%)" in result.stderr
    assert "Mpx/s, ETA 0:00:" in result.stderr
    assert "render: done, 8 chunks" in result.stderr


def test_other_subcommands_run_from_the_cli(layers: Path, capsys) -> None:
    assert run_cli(["downsample", "--src", str(layers / "img"), "--mip", "0", "--dst-mip", "2"], capsys)[0] == 0
    code, out, _ = run_cli(["cpc", "--src", str(layers / "img"), "--dst", str(layers / "cpc"), "--mip", "1",
                            "--patch", "16"], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["sections"][0]["z"] == 1
    assert run_cli(["copy", "--src", str(layers / "field"), "--dst", str(layers / "f2"), "--kind", "field"],
                   capsys)[0] == 0
    code, _, err = run_cli(["convert-field", "--src", str(layers / "field"), "--dst", str(layers / "f3"),
                            "--from", "corgie"], capsys)
    assert code == ExitCode.INVALID_INPUT and "already declares" in err
    code, _, err = run_cli(["downsample", "--src", str(layers / "img"), "--kind", "labels"], capsys)
    assert code == ExitCode.INVALID_INPUT and "unknown --kind 'labels'" in err


def test_ingest_refuses_gaps_and_non_gray_images(tmp_path: Path, capsys) -> None:
    from PIL import Image

    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(sample_section(0)).save(folder / "0.png")
    Image.fromarray(sample_section(1)).save(folder / "2.png")
    code, _, err = run_cli(["ingest", "--images", str(folder), "--dst", str(tmp_path / "l")], capsys)
    assert code == ExitCode.INVALID_INPUT and "sections [1] are missing" in err
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "1.png")
    code, _, err = run_cli(["ingest", "--images", str(folder), "--dst", str(tmp_path / "l")], capsys)
    assert code == ExitCode.INVALID_INPUT and "8-bit grayscale" in err


def test_sigterm_from_a_preempted_pod_exits_130(tmp_path: Path) -> None:
    """A long-running command stopped by SIGTERM says so and exits 130 (retryable), not a traceback."""
    import signal
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "seamless_core", "serve", str(tmp_path), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # "serving ..." is printed after the signal handlers are installed: only then is SIGTERM the step's to handle
    assert process.stdout is not None and process.stdout.readline().startswith("serving ")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # and the server is listening
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == ExitCode.INTERRUPTED
    assert "stopped by SIGTERM" in err and "Traceback" not in err


def test_serve_stops_on_a_signal_that_lands_while_a_connection_is_handed_off() -> None:
    """socketserver logs and swallows an Exception raised while the main thread hands a request to its
    thread; a SIGTERM landing there (CI hit it once) must still stop `seamless serve`, not be logged."""
    import threading

    from seamless_core.errors import Interrupted
    from seamless_core.neuroglancer import _StoppableServer

    with _StoppableServer(("127.0.0.1", 0), object) as server:  # type: ignore[arg-type]
        with pytest.raises(Interrupted):
            try:
                raise Interrupted("stopped by SIGTERM")
            except Exception:
                server.handle_error(None, ("127.0.0.1", 1))
        errors: list[BaseException] = []

        def in_a_request_thread() -> None:  # a handler's own failure is logged and serving goes on
            try:
                try:
                    raise ConnectionResetError("peer went away")
                except Exception:
                    server.handle_error(None, ("127.0.0.1", 1))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        worker = threading.Thread(target=in_a_request_thread)
        worker.start()
        worker.join()
        assert errors == []
