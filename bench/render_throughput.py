"""Render throughput: the full render step (read -> warp -> write on file://) against raw grid_sample.

What it does, in one run:

1. builds, in a temporary folder on file://, a SIZE x SIZE uint8 image layer tiled from the ISBI 2012
   sections in /work/shared/data/isbi2012 (random noise if they are missing), a MIP-0 field layer
   holding a smooth displacement of ~40 px, and a second field layer that stores the same field at
   MIP 2 only (the render upsamples it on the fly);
2. times, best of --repeats (layer creation and other set-up excluded):
   * raw ``torch.nn.functional.grid_sample`` on the whole image as float32 with the same field as a
     normalised grid (bilinear, align_corners=False, zeros padding): the reference for the warp itself,
     and the same grid cut into tiles (context: the warp when its tensors fit in cache);
   * the full render step, ``prepare_render`` + ``render``, at chunk sizes 512, 1024 and 2048 and with
     the field read at MIP 2;
   * read-only (image, field) and write-only (image) throughput of the same layers, chunk by chunk;
   * what-if rows that need no code change: the render and the write into an image layer with the other
     compression setting (gzip where the project's default for images is raw, raw where it is gzip);
3. profiles one render phase by phase (field read, field extent, source read, source to float32,
   grid building, grid_sample, rounding to uint8, chunk bytes, the rest of the write), calling the
   functions render() calls, one phase after another and with one torch thread, so that each phase's
   time is its CPU cost;
4. prints markdown tables and, with --out, rewrites the part of that file between
   ``<!-- render-throughput:start -->`` and ``<!-- render-throughput:end -->``.

The measurements are interleaved (round 1 runs every case once, then round 2, ...), so a burst of
load from another process on a shared machine costs one repeat of several cases rather than every
repeat of one case. Each row also reports the CPU seconds this process used, which moves less than
wall time under such noise, and the run reports how much CPU other processes took meanwhile.

Run:  .venv/bin/python bench/render_throughput.py [--size 4096] [--chunk 1024] [--repeats 3]
                                                  [--device cpu|cuda] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import gc
import glob
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seamless_core import fields  # noqa: E402
from seamless_core.geometry import BBox, chunk_grid  # noqa: E402
from seamless_core.steps.common import processing_chunks, read_clamped, to_numpy, to_tensor  # noqa: E402
from seamless_core.steps.render import (  # noqa: E402
    RenderParams,
    SourceWindow,
    field_extent,
    image_tensor,
    prepare_render,
    render,
    source_box,
    to_layer_dtype,
)
from seamless_core.steps.render import normalised_grid as render_grid  # noqa: E402
from seamless_core.synthetic import smooth_random_field  # noqa: E402
from seamless_core.volumes import (  # noqa: E402
    Layer,
    LayerKind,
    create_from_info,
    create_layer,
    make_image_info,
    open_layer,
)

START = "<!-- render-throughput:start -->"
END = "<!-- render-throughput:end -->"
ISBI_GLOB = "/work/shared/data/isbi2012/*.png"
RESOLUTION = (4.0, 4.0, 40.0)
STORAGE_CHUNK = 512  # the project's default storage chunk (volumes.DEFAULT_CHUNK_XY)
FIELD_MIP = 2
AMPLITUDE = 40.0  # largest displacement, px at MIP 0
TARGET_RATIO = 0.5  # render / raw grid_sample, the target on CPU
PROFILE_RUNS = 3


# --------------------------------------------------------------------------------------------------
# process measurements
# --------------------------------------------------------------------------------------------------
def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so one case's garbage is not the next one's RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); a no-op where that is not allowed."""
    _malloc_trim()
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_rss_mib() -> float:
    """Peak RSS since the last reset (VmHWM), else since the start (getrusage)."""
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    rss = _status_mib("VmRSS")
    return rss if rss is not None else float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MachineLoad:
    """CPU time that *other* processes used meanwhile (from /proc/stat): how noisy the machine was."""

    def __init__(self) -> None:
        self.start = self._busy(), os.times(), os.getloadavg()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait

    def describe(self, wall: float, cpus: int) -> str:
        busy0, t0, load0 = self.start
        busy1, t1 = self._busy(), os.times()
        loads = f"load average {load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
        if busy0 is None or busy1 is None:
            return loads
        other = max(0.0, busy1 - busy0 - ((t1.user + t1.system) - (t0.user + t0.system)))
        share = other / (wall * cpus)
        warning = ""
        if share > 0.2:
            warning = " — **a busy machine: wall times are inflated, compare CPU s or run again**"
        return (f"other processes used {other:.0f} CPU-s during the run ({100 * share:.0f} % of the "
                f"machine); {loads}{warning}")


# --------------------------------------------------------------------------------------------------
# cases and the interleaved driver
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One measured thing: setup (untimed) -> run (timed) -> teardown (untimed), once per round."""

    name: str
    what: str
    chunk: int | str
    field_mip: int | str
    megapixels: float
    run: Callable[[], None]
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_rss_mib: float = 0.0

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mpx_s(self) -> float:
        return self.megapixels / self.best

    @property
    def cpu(self) -> float:
        """CPU seconds of all this process's threads in the fastest repeat."""
        return self.cpu_seconds[self.seconds.index(self.best)]


def measure(cases: list[Case], repeats: int, device: torch.device, log: Callable[[str], None]) -> None:
    for rnd in range(repeats):
        for case in cases:
            case.setup()
            gc.collect()
            reset_peak_rss()
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            case.run()
            sync(device)
            case.seconds.append(time.perf_counter() - t0)
            case.cpu_seconds.append(time.process_time() - c0)
            case.peak_rss_mib = max(case.peak_rss_mib, peak_rss_mib())
            case.teardown()
        log(f"round {rnd + 1}/{repeats} done")


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def tiled_sections(size: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """A size x size uint8 image tiled from the ISBI 2012 sections (rotated/flipped so repeats differ)."""
    paths = sorted(glob.glob(ISBI_GLOB), key=lambda p: (len(p), p))
    if not paths:
        rng = np.random.default_rng(seed)
        noise = rng.integers(0, 256, (size, size), dtype=np.uint8)
        return noise, "random uint8: ISBI 2012 sections not found"
    from PIL import Image

    tiles = [np.asarray(Image.open(p).convert("L"), dtype=np.uint8) for p in paths]
    th, tw = tiles[0].shape
    out = np.empty((size, size), dtype=np.uint8)
    k = 0
    for y in range(0, size, th):
        for x in range(0, size, tw):
            tile = np.rot90(tiles[k % len(tiles)], k // len(tiles))
            if (k // (4 * len(tiles))) % 2:
                tile = tile[:, ::-1]
            h, w = min(th, size - y), min(tw, size - x)
            out[y : y + h, x : x + w] = tile[:h, :w]
            k += 1
    return out, f"{len(tiles)} ISBI 2012 sections of {tw}x{th} tiled"


@dataclass
class Inputs:
    root: str
    size: int
    src: str
    field0: str
    field2: str
    content: str
    image: np.ndarray  # (size, size) uint8
    field_m0: torch.Tensor | None  # (1, 2, size, size) float32 in MIP-0 pixels; dropped once not needed
    max_disp: float
    compress: str = "raw"  # the source image layer's compression: the project's default for images


def build_inputs(root: str, size: int) -> Inputs:
    image, content = tiled_sections(size)
    src_path = "file://" + os.path.join(root, "src")
    info = make_image_info(dtype="uint8", resolution=RESOLUTION, size=(size, size, 1), chunk_xy=STORAGE_CHUNK)
    src = create_from_info(src_path, info, LayerKind.IMAGE)
    src.write(BBox((0, 0, 0), (size, size, 1)), image[None, None])

    # One smooth field stored twice: at MIP 2, and upsampled to MIP 0, so both renders warp by the same
    # displacement. Features ~1000 px at MIP 0, largest displacement AMPLITUDE px.
    coarse_size = -(-size // 2**FIELD_MIP)
    coarse = smooth_random_field(coarse_size, coarse_size, amplitude=AMPLITUDE / 2**FIELD_MIP, wavelength=256,
                                 seed=1)
    field_m0 = fields.resample(coarse, FIELD_MIP, 0)[..., :size, :size].contiguous()

    field0_path = "file://" + os.path.join(root, "field_mip0")
    info0 = make_image_info(dtype="float32", resolution=RESOLUTION, size=(size, size, 1),
                            chunk_xy=STORAGE_CHUNK, kind=LayerKind.FIELD)
    field0 = create_from_info(field0_path, info0, LayerKind.FIELD)
    whole = BBox((0, 0, 0), (size, size, 1))
    for box in chunk_grid(whole, (2048, 2048, 1), (0, 0, 0), whole):
        part = field_m0[..., box.start[1] : box.stop[1], box.start[0] : box.stop[0]]
        field0.write(box, np.ascontiguousarray(part.numpy()))

    field2_path = "file://" + os.path.join(root, "field_mip2")
    info2 = make_image_info(dtype="float32", resolution=RESOLUTION, size=(size, size, 1),
                            chunk_xy=STORAGE_CHUNK, max_mip=FIELD_MIP, kind=LayerKind.FIELD)
    field2 = create_from_info(field2_path, info2, LayerKind.FIELD)
    field2.write(field2.bounds(FIELD_MIP), np.ascontiguousarray(coarse.numpy()))
    return Inputs(root, size, src_path, field0_path, field2_path, content, image, field_m0,
                  fields.max_displacement(field_m0), src.seamless_info.get("compress") or "raw")


# --------------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------------
def normalised_grid(field_m0: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A (1, 2, H, W) pixel field as grid_sample's (1, H, W, 2) grid: x_norm = (2 (x + f_x) + 1) / W - 1."""
    h, w = field_m0.shape[-2:]
    scale = torch.tensor([2.0 / w, 2.0 / h], device=device)
    offset = torch.tensor([1.0 / w - 1.0, 1.0 / h - 1.0], device=device)
    pixels = fields.pixel_grid(h, w, device=device)
    grid = torch.addcmul(offset, (pixels + field_m0.to(device)).permute(0, 2, 3, 1), scale).contiguous()
    fields._pixel_grid.cache_clear()  # keep the (1, 2, H, W) pixel grid out of the later rows' RSS
    return grid


def grid_sample_cases(inp: Inputs, device: torch.device, chunk: int) -> list[Case]:
    """Raw grid_sample on the whole image (the reference), and on the grid cut into chunk² tiles.

    The tensors are built from the layers in each round's (untimed) set-up and dropped afterwards, so
    they do not inflate the other rows' peak RSS.
    """
    field_layer = open_layer(inp.field0, LayerKind.FIELD)
    state: dict[str, object] = {}

    def setup(tiled: bool) -> Callable[[], None]:
        def _setup() -> None:
            field_m0 = torch.from_numpy(np.ascontiguousarray(field_layer.read(field_layer.bounds(0))))
            state["image"] = torch.from_numpy(inp.image).to(torch.float32)[None, None].to(device)
            grid = normalised_grid(field_m0, device)
            del field_m0
            if tiled:
                grid = [grid[:, y : y + chunk, x : x + chunk].contiguous() for y in range(0, inp.size, chunk)
                        for x in range(0, inp.size, chunk)]
            state["grid"] = grid
        return _setup

    def teardown() -> None:
        state.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def run_whole() -> None:
        F.grid_sample(state["image"], state["grid"], mode="bilinear", padding_mode="zeros",
                      align_corners=False)

    def run_tiled() -> None:
        for tile in state["grid"]:
            F.grid_sample(state["image"], tile, mode="bilinear", padding_mode="zeros", align_corners=False)

    for tiled, run in ((False, run_whole), (True, run_tiled)):  # warm-up: allocator, kernels, CUDA context
        setup(tiled)()
        run()
        teardown()
    mpx = inp.size**2 / 1e6
    return [
        Case("grid_sample", "raw F.grid_sample, whole image and grid in memory, float32: **the reference**",
             "whole", 0, mpx, run_whole, setup(False), teardown),
        Case("grid_sample, tiled", f"as above, the grid cut into {chunk}² tiles (context only)",
             chunk, 0, mpx, run_tiled, setup(True), teardown),
    ]


def render_case(inp: Inputs, device: torch.device, chunk: int, field_mip: int, *, name: str = "render",
                what: str = "prepare_render + render, file:// in and out",
                dst_compress: str | bool | None = None) -> Case:
    field_path = inp.field0 if field_mip == 0 else inp.field2
    params = RenderParams(mip=0, field_mip=field_mip, chunk_xy=chunk, device=str(device))
    counter = iter(range(10**6))
    state: dict[str, str] = {}

    def setup() -> None:
        state["dst"] = "file://" + os.path.join(inp.root, f"dst_{name.replace(' ', '_').replace(',', '')}_"
                                                          f"{chunk}_{field_mip}_{next(counter)}")
        if dst_compress is not None:  # pre-create the destination; prepare_render reopens it as it is
            create_layer(state["dst"], like=open_layer(inp.src, LayerKind.IMAGE), kind=LayerKind.IMAGE,
                         max_mip=0, dtype="uint8", compress=dst_compress)

    def run() -> None:
        src, fld, dst, mask, region = prepare_render(inp.src, field_path, state["dst"], None, params)
        render(src, fld, dst, region, params, mask=mask, progress_interval=1e9)

    def teardown() -> None:  # keep the latest output (checked at the end), delete the one before
        if "last" in state:
            shutil.rmtree(state["last"].removeprefix("file://"), ignore_errors=True)
        state["last"] = state["dst"]

    case = Case(name, what, chunk, field_mip, inp.size**2 / 1e6, run, setup, teardown)
    case.output = state  # type: ignore[attr-defined]
    return case


def read_cases(inp: Inputs, chunk: int) -> list[Case]:
    region = BBox((0, 0, 0), (inp.size, inp.size, 1))
    boxes = list(chunk_grid(region, (chunk, chunk, 1), (0, 0, 0), region))
    cases = []
    for name, path, kind, what in (
        ("read image", inp.src, LayerKind.IMAGE, f"Layer.read, uint8, {inp.compress}, chunk-aligned boxes"),
        ("read field", inp.field0, LayerKind.FIELD, "Layer.read, float32 x 2, raw, chunk-aligned boxes"),
    ):
        layer = open_layer(path, kind)

        def run(layer: Layer = layer) -> None:
            for box in boxes:
                layer.read(box)

        cases.append(Case(name, what, chunk, "-" if kind is LayerKind.IMAGE else 0, inp.size**2 / 1e6, run))
    return cases


def write_case(inp: Inputs, chunk: int, compress: str | bool | None, name: str, what: str) -> Case:
    src = open_layer(inp.src, LayerKind.IMAGE)
    region = BBox((0, 0, 0), (inp.size, inp.size, 1))
    boxes = list(chunk_grid(region, (chunk, chunk, 1), (0, 0, 0), region))
    data = [np.ascontiguousarray(inp.image[b.start[1] : b.stop[1], b.start[0] : b.stop[0]])[None, None]
            for b in boxes]
    counter = iter(range(10**6))
    state: dict[str, Layer] = {}

    def setup() -> None:
        path = os.path.join(inp.root, f"write_{name.replace(' ', '_').replace(',', '')}_{next(counter)}")
        state["dst"] = create_layer("file://" + path, like=src, kind=LayerKind.IMAGE, max_mip=0,
                                    dtype="uint8", compress=compress)
        state["path"] = path  # type: ignore[assignment]

    def run() -> None:
        for box, d in zip(boxes, data):
            state["dst"].write(box, d)

    def teardown() -> None:
        shutil.rmtree(state["path"], ignore_errors=True)  # type: ignore[arg-type]

    return Case(name, what, chunk, "-", inp.size**2 / 1e6, run, setup, teardown)


def check_render(inp: Inputs, dst_path: str) -> float:
    """Mean |render - one whole-image warp| away from the borders: chunking must leave no seams."""
    dst = open_layer(dst_path, LayerKind.IMAGE)
    out = dst.read(dst.bounds(0))[0, 0].astype(np.float32)
    field_layer = open_layer(inp.field0, LayerKind.FIELD)
    field_m0 = torch.from_numpy(np.ascontiguousarray(field_layer.read(field_layer.bounds(0))))
    image = torch.from_numpy(inp.image).to(torch.float32)[None, None]
    ref = to_numpy(fields.warp(image, field_m0), "uint8")[0, 0].astype(np.float32)
    m = int(AMPLITUDE) + 2
    return float(np.abs(out[m:-m, m:-m] - ref[m:-m, m:-m]).mean())


# --------------------------------------------------------------------------------------------------
# phase profile: render's load / compute / store, one phase after another, a timer around each
# --------------------------------------------------------------------------------------------------
class Timers:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.total[phase] = self.total.get(phase, 0.0) + time.perf_counter() - t0


WRITE = "write (Layer.write: chunk files, staging, fsync, rename)"


def profile_once(inp: Inputs, chunk: int, device: torch.device, run: int) -> tuple[dict[str, float], dict]:
    """The calls render() makes per chunk (its load and compute, in order) and dst.write, each timed."""
    from cloudfiles import compression

    params = RenderParams(mip=0, field_mip=0, chunk_xy=chunk, device=str(device))
    dst_path = os.path.join(inp.root, f"dst_profile_{run}")
    src, fld, dst, _, region = prepare_render(inp.src, inp.field0, "file://" + dst_path, None, params)
    compress = dst.seamless_info.get("compress")
    storage = dst.chunk_size(0)
    t = Timers(device)
    stats = {"chunks": 0, "storage_chunks_read": 0, "source_px_read": 0, "source_px_copied": 0,
             "storage": storage}
    for box in processing_chunks(dst, region, chunk):
        # = read_displacement(fld, box, 0, device), its two halves timed apart
        with t("field read (Layer.read of the field, to a tensor)"):
            displacement = to_tensor(read_clamped(fld, box), device)
        with t("field extent (per-channel aminmax: source region and finiteness check)"):
            extent = field_extent(displacement)
            origin = source_box(box, extent)
        with t(f"source read (Layer.read, {src.seamless_info.get('compress') or 'raw'})"):
            raw = src.read(origin)
        with t("source to float32 (image_tensor)"):
            image = image_tensor(raw, device)
        window = SourceWindow(displacement, image, origin, None)
        with t("grid building (normalised_grid, in place)"):  # = render_chunk's two calls
            grid = render_grid(window, box, in_place=True)
        with t("grid_sample"):
            out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        with t("round to uint8 (to_layer_dtype)"):
            result = to_layer_dtype(out, dst.dtype)
        with t("encode alone"):  # the chunk files' bytes (and compression, if any), timed apart
            for y in range(0, box.size[1], storage[1]):
                for x in range(0, box.size[0], storage[0]):
                    piece = np.ascontiguousarray(result[0, 0, y : y + storage[1], x : x + storage[0]])
                    compression.compress(piece.tobytes(), compress or None)
        with t(WRITE):
            dst.write(box, result)
        stats["chunks"] += 1
        inside = origin.intersection(src.bounds(0))
        aligned = inside.aligned_to(storage, (0, 0, 0)).intersection(src.bounds(0))
        stats["storage_chunks_read"] += -(-aligned.size[0] // storage[0]) * -(-aligned.size[1] // storage[1])
        stats["source_px_read"] += origin.size[0] * origin.size[1]
        stats["source_px_copied"] += aligned.size[0] * inside.size[1]  # the rows it needs, whole chunk rows
    shutil.rmtree(dst_path, ignore_errors=True)
    phases = dict(t.total)
    encode, write = phases.pop("encode alone"), phases.pop(WRITE)
    phases[f"write: chunk bytes ({compress or 'raw'}, timed apart)"] = min(encode, write)
    phases["write: the rest (staging files, fsync, rename, folder fsync)"] = max(0.0, write - encode)
    return phases, stats


def profile_render(inp: Inputs, chunk: int, device: torch.device, runs: int) -> tuple[dict[str, float], dict]:
    """Per phase, the least time over `runs` profiles (noise only ever adds time).

    On the CPU the profile runs torch with one intra-op thread: the phases then measure CPU cost, and
    stay meaningful on a shared machine, where a 2-thread torch op on a 1 M-element tensor waits for a
    preempted OpenMP thread and takes ~20x longer (measured: 3.7 ms against 0.2 ms for a min()).
    """
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        best: dict[str, float] = {}
        stats: dict = {}
        for run in range(runs):
            phases, stats = profile_once(inp, chunk, device, run)
            best = {k: min(v, best.get(k, v)) for k, v in phases.items()}
    finally:
        torch.set_num_threads(threads)
    return best, stats


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def environment(device: torch.device, inp: Inputs, load: MachineLoad, wall: float, baseline_rss: float,
                run_peak: float, repeats: int, argv: list[str]) -> list[tuple[str, str]]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    dev = str(device)
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return [
        ("date", _dt.date.today().isoformat()),
        ("device", dev),
        ("CPU", f"{cpu}, {os.cpu_count()} logical CPUs ({usable} usable by this process)"),
        ("torch", f"{torch.__version__}, {torch.get_num_threads()} intra-op threads, "
                  f"{torch.get_num_interop_threads()} inter-op threads"),
        ("python / numpy", f"{platform.python_version()} / {np.__version__}"),
        ("image", f"{inp.size}² uint8 ({inp.content}), storage chunk {STORAGE_CHUNK}², compression "
                  f"{inp.compress} (the project's default for image layers)"),
        ("field", f"{inp.size}² float32 x 2 at MIP 0, raw; the same field stored at MIP {FIELD_MIP} only; "
                  f"largest displacement {inp.max_disp:.1f} px"),
        ("repeats", f"best of {repeats}, cases interleaved round by round (median in brackets)"),
        ("machine noise", load.describe(wall, usable)),
        ("RSS", f"peak {run_peak:.0f} MiB over the whole run; {baseline_rss:.0f} MiB before the timed cases "
                "(torch, the inputs)"),
        ("benchmark wall time", f"{wall:.0f} s"),
        ("command", "`" + " ".join([".venv/bin/python", "bench/render_throughput.py", *argv]) + "`"),
    ]


def report(cases: list[Case], ref: Case, main: Case, env: list[tuple[str, str]], check: float, chunk: int,
           phases: dict[str, float], stats: dict) -> str:
    lines = ["| measurement | what | chunk | field MIP | best s (median) | Mpx/s | ÷ grid_sample | CPU s "
             "| peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        lines.append(f"| {c.name} | {c.what} | {c.chunk} | {c.field_mip} | {c.best:.3f} ({c.median:.3f}) | "
                     f"{c.mpx_s:.1f} | {c.mpx_s / ref.mpx_s:.2f} | {c.cpu:.2f} | {c.peak_rss_mib:.0f} |")
    ratio = main.mpx_s / ref.mpx_s
    out = [
        "\n".join(lines),
        "",
        f"**render / raw grid_sample = {main.mpx_s:.1f} / {ref.mpx_s:.1f} Mpx/s = {ratio:.2f}** "
        f"(chunk {chunk}, field at MIP 0): {'meets' if ratio >= TARGET_RATIO else 'misses'} the target "
        f"of ≥ {TARGET_RATIO}. The rendered layer differs from one whole-image `fields.warp` by "
        f"{check:.3f} grey levels on average "
        f"(away from a {int(AMPLITUDE) + 2} px border): chunking leaves no seams.",
        "",
        "Mpx/s: megapixels of the 2D section per second of wall time. CPU s: CPU time of all of this "
        "process's threads in the fastest repeat (more than the wall time where threads overlap).",
        "",
        "| environment | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in env],
    ]
    if phases:
        total = sum(phases.values())
        px = main.megapixels
        whole = stats["storage_chunks_read"] * stats["storage"][0] * stats["storage"][1] / 1e6
        copied = stats["source_px_copied"] / 1e6
        out += [
            "",
            f"Phase profile of the render (chunk {chunk}, field MIP 0, {stats['chunks']} chunks): the calls "
            "`render` makes, one phase after another with no read-ahead or write-behind, so the phases add "
            "up; torch runs with one thread here (on the CPU), so each phase's time is its CPU cost (the "
            "write's also its wait for fsync); per phase the least time of "
            f"{PROFILE_RUNS} runs.",
            "",
            "| phase | s | share | Mpx/s alone |",
            "|---|---:|---:|---:|",
            *[f"| {k} | {v:.3f} | {100 * v / total:.0f} % | {px / v if v else float('inf'):.0f} |"
              for k, v in sorted(phases.items(), key=lambda kv: -kv[1])],
            f"| **total, sequential** | {total:.3f} | 100 % | {px / total:.1f} |",
            "",
            f"Source reads: {stats['source_px_read'] / 1e6:.1f} Mpx requested for {px:.1f} Mpx rendered. "
            f"They touch {stats['storage_chunks_read']} storage chunks of {stats['storage'][0]}² "
            f"({whole:.1f} Mpx, {whole / px:.1f}x, what a whole-chunk reader decodes); the direct file:// "
            f"read of raw chunks copies only the rows it needs, {copied:.1f} Mpx ({copied / px:.2f}x).",
        ]
    return "\n".join(out)


def update_doc(path: str, body: str) -> None:
    """Replace the text between the markers (or append a section with them)."""
    section = f"{START}\n{body}\n{END}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Render throughput\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="image side in px (default 4096)")
    parser.add_argument("--chunk", type=int, default=1024,
                        help="processing chunk of the headline render (default 1024); "
                             "512, 1024 and 2048 all run")
    parser.add_argument("--repeats", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device (default cpu)")
    parser.add_argument("--out", help="markdown file whose render-throughput section is rewritten")
    parser.add_argument("--no-profile", action="store_true", help="skip the phase profile")
    args = parser.parse_args(argv)
    if args.size % STORAGE_CHUNK or args.chunk % STORAGE_CHUNK or args.chunk > args.size:
        parser.error(f"--size and --chunk must be multiples of the storage chunk {STORAGE_CHUNK}, "
                     "and --chunk at most --size")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device here")

    started = time.perf_counter()
    load = MachineLoad()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    root = tempfile.mkdtemp(prefix="render-bench-")
    try:
        log(f"building {args.size}² layers in {root}")
        inp = build_inputs(root, args.size)
        cases = grid_sample_cases(inp, device, args.chunk)
        inp.field_m0 = None
        ref = cases[0]
        main_case = None
        for chunk in sorted({c for c in (512, 1024, 2048, args.chunk) if c <= args.size}):
            cases.append(render_case(inp, device, chunk, 0))
            if chunk == args.chunk:
                main_case = cases[-1]
        cases.append(render_case(inp, device, args.chunk, FIELD_MIP,
                                 what=f"as above, the field stored at MIP {FIELD_MIP}, upsampled per chunk"))
        alt = "gzip" if inp.compress == "raw" else False  # the other setting than the project's default
        alt_name = "gzip" if alt else "raw"
        cases.append(render_case(inp, device, args.chunk, 0, name=f"render, {alt_name} dst", dst_compress=alt,
                                 what=f"what-if: the destination image layer created with compress={alt!r}"))
        cases += read_cases(inp, args.chunk)
        cases.append(write_case(inp, args.chunk, None, "write image",
                                f"Layer.write, uint8, {inp.compress} (the project's default)"))
        cases.append(write_case(inp, args.chunk, alt, f"write image, {alt_name}",
                                f"what-if: compress={alt!r}"))
        assert main_case is not None
        gc.collect()
        _malloc_trim()
        build_peak, baseline_rss = peak_rss_mib(), current_rss_mib()  # before measure() resets VmHWM
        log(f"{len(cases)} cases x {args.repeats} rounds")
        measure(cases, args.repeats, device, log)
        reads = [c for c in cases if c.name.startswith("read ")]
        cases.insert(cases.index(reads[-1]) + 1, Case(
            "read image + field", "the two rows above together: what one render reads", args.chunk, 0,
            inp.size**2 / 1e6, lambda: None, seconds=[sum(c.best for c in reads)],
            cpu_seconds=[sum(c.cpu for c in reads)], peak_rss_mib=max(c.peak_rss_mib for c in reads)))
        check = check_render(inp, main_case.output["last"])  # type: ignore[attr-defined]
        phases, stats = {}, {}
        if not args.no_profile:
            log("phase profile")
            phases, stats = profile_render(inp, args.chunk, device, PROFILE_RUNS)
        wall = time.perf_counter() - started
        run_peak = max(build_peak, peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       *(c.peak_rss_mib for c in cases))
        env = environment(device, inp, load, wall, baseline_rss, run_peak, args.repeats, argv)
        body = report(cases, ref, main_case, env, check, args.chunk, phases, stats)
        print(body)
        if args.out:
            update_doc(args.out, body)
            log(f"wrote {args.out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
