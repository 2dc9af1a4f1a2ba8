"""CloudVolume layers (image, field, mask, quality) with validation, derivation and atomic writes.

Why a wrapper around CloudVolume: every step needs the same checks before any work starts (the layer
exists, has the dtype, channels, MIP and field convention the step needs) and the same guarantees
while writing (chunk-aligned, never a torn chunk, retries on transient storage faults).
Arrays cross this module as numpy (z, c, y, x), the layout torch wants; CloudVolume's own
layout is (x, y, z, c).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from cloudfiles.exceptions import DecompressionError
from cloudvolume.exceptions import EmptyVolumeException, InfoUnavailableError
from cloudvolume.lib import jsonify
from tenacity import RetryError, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from .errors import InputError, LayerError, StorageError
from .paths import SUPPORTED_SCHEMES, normalise_path  # noqa: F401  (re-exported: steps import them from here)
from .geometry import BBox, Vec3
from .storage_retries import CONNECTION_ERRORS, TRANSIENT_STATUS, fail_fast_in_cloudfiles, is_permanent, object_name

log = logging.getLogger(__name__)

INFO_KEY = "seamless"
DEFAULT_CHUNK_XY = 512  # storage chunk of derived layers: 1 MiB of float32 field per chunk and section
FIELD_CONVENTION: dict[str, Any] = {
    "version": 1,
    "convention": "pull",
    "formula": "out(p) = src(p + f(p))",
    "units": "pixels of this scale (MIP)",
    "channels": ["x", "y"],
    "channel_meaning": "channel 0: displacement along CloudVolume x; channel 1: along CloudVolume y",
}
T = TypeVar("T")
fail_fast_in_cloudfiles()  # a 403 fails a step at once instead of after a minute of cloud-files retries


def _decode_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this chunk's bytes do not decode" across cloud-files' codecs."""
    errors: list[type[BaseException]] = [ValueError, EOFError, DecompressionError]
    try:
        from deflate import DeflateError  # cloud-files' fast gzip, when installed

        errors.append(DeflateError)
    except ImportError:
        pass
    return tuple(errors)


DECODE_ERRORS = _decode_errors()


class LayerKind(str, Enum):
    IMAGE = "image"
    FIELD = "field"
    MASK = "mask"
    QUALITY = "quality"  # float maps such as CPC or vote agreement


@dataclass(frozen=True)
class LayerSpec:
    """What a kind of layer must look like."""

    dtypes: tuple[str, ...]
    channels: int


LAYER_SPECS: dict[LayerKind, LayerSpec] = {
    LayerKind.IMAGE: LayerSpec(("uint8", "float32"), 1),
    LayerKind.FIELD: LayerSpec(("float32",), 2),
    LayerKind.MASK: LayerSpec(("uint8",), 1),
    LayerKind.QUALITY: LayerSpec(("float32",), 1),
}


def storage_secrets(path: str) -> Any:
    """Credentials for CloudVolume: anonymous against a GCS emulator, else CloudVolume's defaults.

    Real credentials come from files mounted from Kubernetes Secrets (GOOGLE_APPLICATION_CREDENTIALS,
    ~/.cloudvolume/secrets); they are never passed on the command line or logged.
    """
    if path.startswith("gs://") and os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    return None


def _is_transient(exc: BaseException) -> bool:
    """Storage faults worth retrying: network trouble, throttling, server errors."""
    if isinstance(exc, (EmptyVolumeException, InfoUnavailableError, FileNotFoundError, InputError)):
        return False
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    code = getattr(exc, "code", None) or getattr(getattr(exc, "response", None), "status_code", None)
    return code in TRANSIENT_STATUS


def _refused(exc: BaseException, what: str) -> LayerError:
    """A permanent refusal by the store (4xx), as an error naming the action, the layer and the object."""
    code = getattr(exc, "code", "4xx")
    name = object_name(exc)
    hint = {401: "the credentials were not accepted: check the mounted service-account key",
            403: "the credentials lack permission: grant them access to that bucket (storage.objects.get to "
                 "read, storage.objects.create to write) or check the path",
            404: "it does not exist: check the path"}.get(code, "check the path and the layer")  # type: ignore[call-overload]
    return LayerError(f"{what}: the store refused it with HTTP {code}" + (f" for object {name}" if name else "")
                      + f" (permanent, not retried); {hint}")


def with_retries(action: Callable[[], T], what: str, attempts: int = 5) -> T:
    """Run a storage action, retrying transient faults with exponential backoff."""
    try:
        for attempt in Retrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.5, max=20),
            reraise=False,
        ):
            with attempt:
                return action()
    except RetryError as exc:
        cause = exc.last_attempt.exception()
        raise StorageError(f"{what} failed after {attempts} attempts: {cause}") from cause
    except Exception as exc:
        if is_permanent(exc):
            raise _refused(exc, what) from exc
        raise
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class Layer:
    """An opened, validated layer; one CloudVolume handle per MIP, created lazily."""

    path: str
    info: dict[str, Any]
    kind: LayerKind
    fill_missing: bool = False
    cache_bytes: int = 0  # LRU of decoded chunks, for read-only sources whose chunks overlapping reads share
    _handles: dict[int, CloudVolume] = field(default_factory=dict, repr=False)

    # -- description ---------------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return self.path.split("://", 1)[0]

    @property
    def dtype(self) -> str:
        return str(self.info["data_type"])

    @property
    def num_channels(self) -> int:
        return int(self.info["num_channels"])

    @property
    def mips(self) -> list[int]:
        return list(range(len(self.info["scales"])))

    @property
    def seamless_info(self) -> dict[str, Any]:
        return dict(self.info.get(INFO_KEY, {}))

    def scale(self, mip: int) -> dict[str, Any]:
        if mip not in self.mips:
            raise LayerError(
                f"layer {self.path} has no MIP {mip} (it has MIPs {self.mips[0]}..{self.mips[-1]}); "
                "run `seamless downsample` to build it or choose another --mip"
            )
        return self.info["scales"][mip]

    def resolution(self, mip: int) -> tuple[float, float, float]:
        return tuple(float(r) for r in self.scale(mip)["resolution"])  # type: ignore[return-value]

    def chunk_size(self, mip: int) -> Vec3:
        return tuple(int(c) for c in self.scale(mip)["chunk_sizes"][0])  # type: ignore[return-value]

    def voxel_offset(self, mip: int) -> Vec3:
        return tuple(int(v) for v in self.scale(mip)["voxel_offset"])  # type: ignore[return-value]

    def bounds(self, mip: int) -> BBox:
        scale = self.scale(mip)
        return BBox.from_size(scale["voxel_offset"], scale["size"], mip)

    @cached_property
    def factors(self) -> dict[int, Vec3]:
        """Downsampling factor of each MIP relative to MIP 0, from the resolutions."""
        base = self.info["scales"][0]["resolution"]
        return {
            m: tuple(int(round(r / b)) for r, b in zip(s["resolution"], base))  # type: ignore[misc]
            for m, s in enumerate(self.info["scales"])
        }

    # -- I/O -----------------------------------------------------------------------------------------
    def cv(self, mip: int) -> CloudVolume:
        self.scale(mip)
        if mip not in self._handles:
            self._handles[mip] = CloudVolume(
                self.path,
                mip=mip,
                info=self.info,
                bounded=False,
                fill_missing=self.fill_missing,
                progress=False,
                cdn_cache=False,
                non_aligned_writes=False,
                delete_black_uploads=False,
                compress=self.seamless_info.get("compress"),
                secrets=storage_secrets(self.path),
                lru_bytes=self.cache_bytes,
                lru_encoding="raw",
            )
        return self._handles[mip]

    def read(self, bbox: BBox) -> np.ndarray:
        """Voxels of `bbox` as (z, c, y, x); zeros outside the volume's bounds."""
        if self._direct_io(bbox.mip):
            direct = self._read_file_direct(bbox)
            if direct is not None:
                return direct

        def _read() -> np.ndarray:
            return np.asarray(self.cv(bbox.mip)[bbox.to_slices()])

        try:
            data = with_retries(_read, f"reading {self.path} {bbox}")
        except EmptyVolumeException as exc:
            raise LayerError(
                f"layer {self.path} has no data in {bbox} (missing chunk {exc}); if empty regions are "
                "expected there, pass --fill-missing"
            ) from None
        except InputError:
            raise  # the store refused the read (with_retries named it); a ValueError like the decode errors
        except DECODE_ERRORS as exc:  # a truncated or corrupt chunk, e.g. written by another tool
            raise LayerError(f"layer {self.path} has an unreadable chunk in {bbox}: {exc}; rewrite that region") from None
        return data.transpose(2, 3, 1, 0)

    def write(self, bbox: BBox, data: np.ndarray) -> None:
        """Write (z, c, y, x) voxels of a chunk-aligned `bbox`; atomic per storage chunk."""
        expected = (bbox.size[2], self.num_channels, bbox.size[1], bbox.size[0])
        if tuple(data.shape) != expected:
            raise ValueError(f"writing {bbox} to {self.path}: data shape {data.shape}, expected {expected}")
        if str(data.dtype) != self.dtype:
            raise ValueError(f"writing {data.dtype} data to {self.dtype} layer {self.path}")
        self._check_aligned(bbox)
        if self._direct_io(bbox.mip):
            with_retries(lambda: self._write_file_direct(bbox, data), f"writing {self.path} {bbox}")
            return
        cutout = data.transpose(3, 2, 0, 1)  # (x, y, z, c), a view
        if self.scheme == "file":
            with_retries(lambda: self._write_file_atomic(bbox, cutout), f"writing {self.path} {bbox}")
        else:  # object stores replace whole objects: a chunk is either old or new, never torn
            with_retries(lambda: self.cv(bbox.mip).__setitem__(bbox.to_slices(), cutout), f"writing {self.path} {bbox}")

    def _check_aligned(self, bbox: BBox) -> None:
        bounds = self.bounds(bbox.mip)
        if not bounds.contains(bbox):
            raise ValueError(f"{bbox} lies outside {self.path} bounds {bounds}")
        grid = bbox.aligned_to(self.chunk_size(bbox.mip), self.voxel_offset(bbox.mip)).intersection(bounds)
        if grid != bbox:
            raise ValueError(f"{bbox} is not aligned to the chunks of {self.path} ({self.chunk_size(bbox.mip)})")

    def _write_file_atomic(self, bbox: BBox, cutout: np.ndarray) -> None:
        """Encode into a private staging folder, then rename each chunk file into place.

        os.replace is atomic on one filesystem, so a reader (or a rerun after SIGKILL) sees each chunk
        either complete or as it was before; a killed writer leaves only staging debris.
        """
        root = urlparse(self.path).path
        staging = os.path.join(root, ".staging", uuid.uuid4().hex)
        key = self.scale(bbox.mip)["key"]
        try:
            stage = CloudVolume(
                "file://" + staging,
                mip=bbox.mip,
                info=self.info,
                progress=False,
                non_aligned_writes=False,
                delete_black_uploads=False,
                compress=self.seamless_info.get("compress"),
            )
            stage[bbox.to_slices()] = cutout
            target_dir = os.path.join(root, key)
            os.makedirs(target_dir, exist_ok=True)
            names = os.listdir(os.path.join(staging, key))
            for name in names:  # durable before visible: a node crash cannot expose an empty chunk
                with open(os.path.join(staging, key, name), "rb") as handle:
                    os.fsync(handle.fileno())
            for name in names:
                os.replace(os.path.join(staging, key, name), os.path.join(target_dir, name))
            _fsync_dir(target_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- direct file:// I/O for raw, unsharded layers --------------------------------------------------
    # CloudVolume's precomputed path spends more than the copies themselves on file:// (per-call handles
    # and chunk objects, decode and render-buffer copies, a staging CloudVolume per write): measured on a
    # 4096² section in 1024² boxes, 0.064 s against 0.033 s to read a float32 field and 0.076 s against
    # 0.04 s to write a uint8 image (fsync included). For raw chunks on a local filesystem the format is
    # trivial, so reads and writes go straight to the chunk files. The layout is exactly
    # CloudVolume's: one file per chunk named x0-x1_y0-y1_z0-z1 (clipped to the bounds) under the scale's
    # key, holding the (x, y, z, c) chunk in Fortran order, i.e. (c, z, y, x) in C order. Anything
    # unusual (a missing or compressed chunk, a size mismatch) falls back to CloudVolume, which then
    # fills, decodes or reports it exactly as before.
    def _direct_io(self, mip: int) -> bool:
        if self.scheme != "file" or self.seamless_info.get("compress") or sys.byteorder != "little":
            return False
        if not hasattr(os, "preadv"):  # pragma: no cover - not on Windows or macOS < 11
            return False
        scale = self.scale(mip)
        return scale.get("encoding", "raw") == "raw" and not scale.get("sharding")

    def _chunk_files(self, bbox: BBox) -> tuple[str, list[tuple[str, BBox]]]:
        """The chunk files that `bbox` (clipped to the bounds) touches, with each file's own box."""
        scale = self.scale(bbox.mip)
        chunk = self.chunk_size(bbox.mip)
        offset = self.voxel_offset(bbox.mip)
        bounds = self.bounds(bbox.mip)
        inside = bbox.intersection(bounds)
        folder = os.path.join(urlparse(self.path).path, scale["key"])
        if inside.is_empty:
            return folder, []
        ranges = []
        for axis in range(3):
            first = (inside.start[axis] - offset[axis]) // chunk[axis]
            last = -(-(inside.stop[axis] - offset[axis]) // chunk[axis])
            ranges.append([(offset[axis] + i * chunk[axis],
                            min(offset[axis] + (i + 1) * chunk[axis], bounds.stop[axis]))
                           for i in range(first, last)])
        files = []
        for z0, z1 in ranges[2]:
            for y0, y1 in ranges[1]:
                for x0, x1 in ranges[0]:
                    box = BBox((x0, y0, z0), (x1, y1, z1), bbox.mip)
                    files.append((f"{x0}-{x1}_{y0}-{y1}_{z0}-{z1}", box))
        return folder, files

    def _read_file_direct(self, bbox: BBox) -> np.ndarray | None:
        """`bbox` read straight from raw chunk files; None where CloudVolume must handle it.

        Per file only the rows the box needs (whole chunk rows) are read, with pread into a reused
        per-thread buffer, and copied once into the result: no per-call CloudVolume objects, no decode
        copies, and the render's padded, overlapping reads need no decoded-chunk LRU (the page cache
        serves the rows they share).
        """
        dtype = np.dtype(self.dtype)
        channels = self.num_channels
        shape = (bbox.size[2], channels, bbox.size[1], bbox.size[0])
        bounds = self.bounds(bbox.mip)
        folder, files = self._chunk_files(bbox)
        out = np.empty(shape, dtype) if bounds.contains(bbox) else np.zeros(shape, dtype)
        for name, box in files:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except FileNotFoundError:  # missing or compressed: CloudVolume fills, decodes or reports it
                return None
            try:
                cx, cy, cz = box.size
                if os.fstat(fd).st_size != cx * cy * cz * channels * dtype.itemsize:
                    return None  # torn or foreign: CloudVolume's decoder reports it
                part = box.intersection(bbox)
                xa, ya, za = (part.start[i] - box.start[i] for i in range(3))
                xb, yb, zb = (part.stop[i] - box.start[i] for i in range(3))
                row = cx * dtype.itemsize
                span = (yb - ya) * row
                buffer = _read_buffer(span)
                rows = np.frombuffer(buffer, dtype, count=(yb - ya) * cx).reshape(yb - ya, cx)
                ox, oy, oz = (part.start[i] - bbox.start[i] for i in range(3))
                for c in range(channels):
                    for z in range(za, zb):
                        _pread_exact(fd, memoryview(buffer)[:span], ((c * cz + z) * cy + ya) * row)
                        out[oz + z - za, c, oy : oy + yb - ya, ox : ox + xb - xa] = rows[:, xa:xb]
            finally:
                os.close(fd)
        return out

    def _write_file_direct(self, bbox: BBox, data: np.ndarray) -> None:
        """Write raw chunk files to a private staging folder, fsync them, rename them into place, then
        fsync the chunk folder: the same old-or-new guarantee per chunk as `_write_file_atomic`, and
        the renames are durable once the call returns."""
        folder, files = self._chunk_files(bbox)
        staging = os.path.join(urlparse(self.path).path, ".staging", uuid.uuid4().hex)
        os.makedirs(staging)
        try:
            handles: list[int] = []
            try:
                for name, box in files:
                    part = data[
                        box.start[2] - bbox.start[2] : box.stop[2] - bbox.start[2],
                        :,
                        box.start[1] - bbox.start[1] : box.stop[1] - bbox.start[1],
                        box.start[0] - bbox.start[0] : box.stop[0] - bbox.start[0],
                    ]
                    piece = np.ascontiguousarray(part.transpose(1, 0, 2, 3))  # (c, z, y, x): raw chunk bytes
                    fd = os.open(os.path.join(staging, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                    handles.append(fd)
                    _write_all(fd, memoryview(piece).cast("B"))
                for fd in handles:  # durable before visible: a node crash cannot expose an empty chunk
                    os.fsync(fd)
            finally:
                for fd in handles:
                    os.close(fd)
            os.makedirs(folder, exist_ok=True)
            for name, _ in files:
                os.replace(os.path.join(staging, name), os.path.join(folder, name))
            _fsync_dir(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def commit_info(self) -> None:
        """Write the info file whole (CloudVolume's format), never torn: see `put_whole`."""
        text = jsonify(self.info, sort_keys=True, indent=2, separators=(",", ": "))
        put_whole(self.path, "info", text.encode(), f"writing the info file of {self.path}")
        self._handles.clear()


def put_whole(folder: str, name: str, data: bytes, what: str) -> None:
    """Write one small file (an info file, a restart marker, a summary) that readers see whole or not at all.

    Object stores replace an object atomically. On file:// cloud-files truncates the file and then writes it,
    so a writer killed in between left an empty or cut info file, which every later open of the layer refuses,
    or a cut marker that stops the rerun (tests/reliability/test_kills.py kills steps there). Here the bytes
    go to a staging file beside the folder, fsynced, then os.replace puts them in place.
    """
    folder = normalise_path(folder)
    if not folder.startswith("file://"):
        files = CloudFiles(folder, secrets=storage_secrets(folder))
        with_retries(lambda: files.put(name, data, content_type="application/json", compress=None,
                                       cache_control="no-cache"), what)
        return
    root = urlparse(folder).path
    target = os.path.join(root, name)
    staging = os.path.join(root, ".staging")

    def _put() -> None:
        os.makedirs(staging, exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        temporary = os.path.join(staging, f"{uuid.uuid4().hex}-{os.path.basename(name)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_all(fd, memoryview(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
        _fsync_dir(os.path.dirname(target))

    with_retries(_put, what)


_THREAD_BUFFERS = threading.local()


def _read_buffer(size: int) -> bytearray:
    """A per-thread scratch buffer of at least `size` bytes, reused across reads (no page faults)."""
    buffer = getattr(_THREAD_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = bytearray(size)
        _THREAD_BUFFERS.buffer = buffer
    return buffer


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise EOFError(f"chunk file shorter than expected at byte {offset}")
        view, offset = view[n:], offset + n


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view):]


def _fsync_dir(path: str) -> None:
    """Make renames into `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


STALE_STAGING_S = 6 * 3600  # no write takes hours: older staging folders belong to killed writers


def clean_stale_staging(layer: Layer, max_age_s: float = STALE_STAGING_S) -> int:
    """Remove staging folders left by killed writers (file:// only); returns how many were removed.

    Other steps write to the same layer meanwhile, and each removes its own staging folder when it is
    done, so an entry listed here may be gone by the time it is looked at: that is not an error."""
    if layer.scheme != "file":
        return 0
    staging_root = os.path.join(urlparse(layer.path).path, ".staging")
    removed = 0
    try:
        entries = list(os.scandir(staging_root))
    except FileNotFoundError:
        return 0
    now = time.time()
    for entry in entries:
        try:
            if now - entry.stat().st_mtime <= max_age_s:
                continue
            if entry.is_dir():
                shutil.rmtree(entry.path)
            else:  # a small file's staging copy (put_whole)
                os.unlink(entry.path)
        except FileNotFoundError:  # its writer (or another cleaner) removed it first
            continue
        removed += 1
    return removed


MISSING_CREDENTIALS = ("DefaultCredentialsError", "NoCredentialsError", "PartialCredentialsError")
CREDENTIALS_HINT = {
    "gs": "put a service-account key in ~/.cloudvolume/secrets/google-secret.json or name it in "
          "GOOGLE_APPLICATION_CREDENTIALS (on Kubernetes: the chart's secrets.gcs)",
    "s3": "put {\"AWS_ACCESS_KEY_ID\": ..., \"AWS_SECRET_ACCESS_KEY\": ...} in ~/.cloudvolume/secrets/aws-secret.json "
          "or set those environment variables (on Kubernetes: the chart's secrets.aws)",
}


def _credentials_failed(exc: BaseException) -> bool:
    """Missing or unusable storage credentials: google-auth's and botocore's errors (without importing
    either), or any error raised while google-auth loads a key (a malformed key file: cryptography's ValueError)."""
    if type(exc).__name__ in MISSING_CREDENTIALS:
        return True
    frame = exc.__traceback__
    while frame is not None:
        name = frame.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/google/oauth2/" in name or "/google/auth/" in name:
            return True
        frame = frame.tb_next
    return False


def _fetch_info(path: str) -> dict[str, Any] | None:
    # "precomputed://" explicitly: without it CloudVolume probes a path with no info file as zarr,
    # one more request per lookup (and ~20 s of retries against emulators without a batch API).
    try:
        cv = CloudVolume("precomputed://" + path, progress=False, secrets=storage_secrets(path))
    except InfoUnavailableError:
        return None
    except Exception as exc:
        if _credentials_failed(exc):
            said = exc.args[0] if exc.args and isinstance(exc.args[0], str) else type(exc).__name__
            said = (said.strip().splitlines() or [type(exc).__name__])[0][:300]  # names files or variables, not keys
            raise LayerError(f"no usable credentials to read {path} ({said}); "
                             + CREDENTIALS_HINT.get(path.split("://", 1)[0], "check the path")) from None
        raise
    except json.JSONDecodeError as exc:  # orjson's error derives from it
        raise LayerError(
            f"the info file of {path} is not valid JSON ({exc}): on file:// a writer killed while writing it "
            f"leaves it empty or cut short. Delete {path.rstrip('/')}/info and rerun the step that creates the "
            "layer: it writes the info again from its source and keeps the layer's chunks"
        ) from None
    return copy.deepcopy(cv.info)


SOURCE_CACHE_BYTES = 256 * 2**20


def open_layer(path: str, kind: LayerKind, *, fill_missing: bool = False, role: str = "layer",
               cache_bytes: int = 0) -> Layer:
    """Open an existing layer and check it is what a step expects; `role` names it in errors (e.g. --src).

    `cache_bytes` > 0 keeps recently decoded chunks (only for layers this process does not write):
    padded reads of neighbouring chunks then fetch each storage chunk once, not ~3 times.
    """
    path = normalise_path(path)
    info = with_retries(lambda: _fetch_info(path), f"reading the info file of {path}")
    if info is None:
        raise LayerError(f"{role}: no layer at {path} (its info file is missing); check the path or create it first")
    layer = Layer(path, info, kind, fill_missing, cache_bytes)
    validate_layer(layer, role)
    return layer


def validate_layer(layer: Layer, role: str) -> None:
    spec = LAYER_SPECS[layer.kind]
    if layer.dtype not in spec.dtypes:
        raise LayerError(
            f"{role}: {layer.path} has data type {layer.dtype}, but a {layer.kind.value} layer must be "
            + " or ".join(spec.dtypes)
        )
    if layer.num_channels != spec.channels:
        raise LayerError(
            f"{role}: {layer.path} has {layer.num_channels} channels, but a {layer.kind.value} layer has "
            f"{spec.channels}"
        )
    if layer.kind is LayerKind.FIELD:
        convention = layer.seamless_info.get("field")
        if not convention or convention.get("convention") != "pull" or convention.get("version") != 1:
            raise LayerError(
                f"{role}: {layer.path} does not declare the field convention in its info file "
                f"(info['{INFO_KEY}']['field']); if it was written by corgie or old SEAMLeSS, convert it "
                "with `seamless convert-field --from corgie|seamless-legacy`"
            )


def check_same_grid(a: Layer, mip_a: int, b: Layer, mip_b: int, what: str) -> None:
    """Two layers must describe the same physical grid where a step combines them voxel for voxel."""
    if a.resolution(mip_a) != b.resolution(mip_b):
        raise LayerError(
            f"{what}: resolution mismatch, {a.path} MIP {mip_a} is {a.resolution(mip_a)} nm but "
            f"{b.path} MIP {mip_b} is {b.resolution(mip_b)} nm; choose MIPs with equal resolution"
        )


def check_within(layer: Layer, bbox: BBox, role: str) -> None:
    bounds = layer.bounds(bbox.mip)
    if bbox.is_empty:
        raise InputError(f"{role}: the requested region {bbox} is empty")
    if not bounds.contains(bbox):
        raise InputError(
            f"{role}: the requested region {bbox} is outside {layer.path}, whose bounds are {bounds}; "
            "pass a --bbox / --z inside them"
        )


def create_layer(
    path: str,
    *,
    like: Layer,
    kind: LayerKind,
    max_mip: int,
    dtype: str | None = None,
    chunk_xy: int | None = None,
    compress: str | bool | None = None,
    extra: dict[str, Any] | None = None,
) -> Layer:
    """Create (or reopen, if compatible) a destination layer derived from `like`.

    Resolution, offset, size, the MIP pyramid and the xy chunking come from the source; z chunks are 1
    so each section is written independently. Creating an existing compatible layer is a no-op, so a retried
    task never fails on its own earlier output.
    """
    path = normalise_path(path)
    if path == like.path:
        raise InputError(f"the destination {path} is the source itself; choose another destination")
    spec = LAYER_SPECS[kind]
    dtype = dtype or spec.dtypes[0]
    if dtype not in spec.dtypes:
        raise InputError(f"a {kind.value} layer cannot be {dtype}; use " + " or ".join(spec.dtypes))
    chunk = chunk_xy or like.chunk_size(0)[0]
    scales = []
    for mip in range(max_mip + 1):
        src_scale = like.scale(mip) if mip in like.mips else _derived_scale(scales[-1])
        scales.append(
            {
                "key": "_".join(_fmt(r) for r in src_scale["resolution"]),
                "resolution": list(src_scale["resolution"]),
                "voxel_offset": list(src_scale["voxel_offset"]),
                "size": list(src_scale["size"]),
                "chunk_sizes": [[chunk, chunk, 1]],
                "encoding": "raw",
            }
        )
    seamless = {"kind": kind.value, "compress": compress if compress is not None else _default_compress(kind)}
    if kind is LayerKind.FIELD:
        seamless["field"] = dict(FIELD_CONVENTION)
    seamless.update(extra or {})
    info = {
        "type": "image",
        "data_type": dtype,
        "num_channels": spec.channels,
        "scales": scales,
        INFO_KEY: seamless,
    }
    existing = _fetch_info(path)
    if existing is not None:
        layer = Layer(path, existing, kind)
        _check_compatible(layer, info)
        clean_stale_staging(layer)
        return layer
    layer = Layer(path, info, kind)
    layer.commit_info()
    return layer


def _default_compress(kind: LayerKind) -> str | bool:
    """Raw for images, fields and quality maps; gzip for masks.

    Measured on the shared ssTEM sections: gzip shrinks EM images by only 9 % (level 1 to 9 alike) at
    about 50 MB/s per core, and float fields barely at all, while masks are mostly zeros and shrink
    many-fold. Compression costs CPU on every read and write of the pipeline.
    """
    return "gzip" if kind is LayerKind.MASK else False


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _derived_scale(prev: dict[str, Any]) -> dict[str, Any]:
    """The next MIP of a pyramid: half the resolution in x and y."""
    return {
        "resolution": [prev["resolution"][0] * 2, prev["resolution"][1] * 2, prev["resolution"][2]],
        "voxel_offset": [prev["voxel_offset"][0] // 2, prev["voxel_offset"][1] // 2, prev["voxel_offset"][2]],
        "size": [-(-prev["size"][0] // 2), -(-prev["size"][1] // 2), prev["size"][2]],
    }


def _check_compatible(layer: Layer, wanted: dict[str, Any]) -> None:
    problems = []
    if layer.dtype != wanted["data_type"]:
        problems.append(f"data type {layer.dtype} (wanted {wanted['data_type']})")
    if layer.num_channels != wanted["num_channels"]:
        problems.append(f"{layer.num_channels} channels (wanted {wanted['num_channels']})")
    if layer.kind is LayerKind.FIELD and not layer.seamless_info.get("field"):
        problems.append("no field convention in its info")
    for mip, scale in enumerate(wanted["scales"]):
        if mip >= len(layer.info["scales"]):
            problems.append(f"no MIP {mip}")
            break
        have = layer.info["scales"][mip]
        for key in ("resolution", "voxel_offset", "size"):
            if [float(v) for v in have[key]] != [float(v) for v in scale[key]]:
                problems.append(f"MIP {mip} {key} {have[key]} (wanted {scale[key]})")
    if problems:
        raise LayerError(
            f"destination {layer.path} already exists and differs: " + "; ".join(problems)
            + ". Choose a new destination or delete the old layer."
        )


def make_image_info(
    *,
    dtype: str,
    resolution: Sequence[float],
    size: Sequence[int],
    voxel_offset: Sequence[int] = (0, 0, 0),
    chunk_xy: int = DEFAULT_CHUNK_XY,
    max_mip: int = 0,
    kind: LayerKind = LayerKind.IMAGE,
) -> dict[str, Any]:
    """Info for a brand-new layer that has no source to derive from (ingest, synthetic data)."""
    spec = LAYER_SPECS[kind]
    base = {"resolution": list(resolution), "voxel_offset": list(voxel_offset), "size": list(size)}
    scales = [base]
    for _ in range(max_mip):
        scales.append(_derived_scale(scales[-1]))
    info: dict[str, Any] = {
        "type": "image",
        "data_type": dtype,
        "num_channels": spec.channels,
        "scales": [
            dict(s, key="_".join(_fmt(r) for r in s["resolution"]), chunk_sizes=[[chunk_xy, chunk_xy, 1]], encoding="raw")
            for s in scales
        ],
        INFO_KEY: {"kind": kind.value, "compress": _default_compress(kind)},
    }
    if kind is LayerKind.FIELD:
        info[INFO_KEY]["field"] = dict(FIELD_CONVENTION)
    return info


def create_from_info(path: str, info: dict[str, Any], kind: LayerKind) -> Layer:
    """Create a layer from a complete info dict (or reopen it when identical in geometry)."""
    path = normalise_path(path)
    existing = _fetch_info(path)
    if existing is not None:
        layer = Layer(path, existing, kind)
        _check_compatible(layer, info)
        clean_stale_staging(layer)
        return layer
    layer = Layer(path, copy.deepcopy(info), kind)
    layer.commit_info()
    return layer


def ensure_mips(layer: Layer, max_mip: int) -> None:
    """Add derived scales up to `max_mip` to a layer's info (idempotent), for building a pyramid."""
    if max_mip < len(layer.info["scales"]):
        return
    chunk = layer.info["scales"][-1]["chunk_sizes"][0]
    while len(layer.info["scales"]) <= max_mip:
        scale = _derived_scale(layer.info["scales"][-1])
        scale.update(key="_".join(_fmt(r) for r in scale["resolution"]), chunk_sizes=[list(chunk)], encoding="raw")
        layer.info["scales"].append(scale)
    layer.__dict__.pop("factors", None)
    layer.commit_info()
