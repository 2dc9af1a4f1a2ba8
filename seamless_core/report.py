"""`seamless report`: an HTML quality report of an alignment that a scientist opens in a browser.

It reads what the workflow leaves under a destination folder (the contract, see docs/cli.md):

    {dst}/image        the aligned image (uint8, MIP pyramid)
    {dst}/cpc          CPC of the aligned image, with per-section summaries in summary/<z>.json
    {dst}/cpc_source   CPC of the unaligned source stack, same MIP and patch (the "before")
    {dst}/.seamless/steps/z<z>.compose.json   optional: the compose steps' markers, whose reports give
                       the share of each section's final field that folds (docs/estimators.md, "Folds")
                       and how far it turns and shifts the section (its rigid part, "Drift")

and writes `index.html` with plots of per-section CPC before and after, a table of every section, the
worst sections with before/after thumbnails and red/green overlays of each section and its neighbour,
the lowest-scoring CPC windows, and Neuroglancer links. The page is self-contained (inline CSS, PNGs
beside it under img/, no JavaScript). Every file is written to a temporary name and renamed into
place, so a rerun replaces the old report cleanly; PNGs the new page no longer uses are removed.
"""

from __future__ import annotations

import html
import io
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from cloudfiles import CloudFiles

from .errors import InputError, LayerError, SeamlessError
from .neuroglancer import viewer_link
from .plan import Layout, compose_step
from .steps.folds import FOLD_WARNING_SHARE
from .volumes import (
    Layer,
    LayerKind,
    _fetch_info,
    check_within,
    normalise_path,
    open_layer,
    storage_secrets,
    with_retries,
)

log = logging.getLogger("seamless.report")

THUMB_MIN_SIDE = 256  # default thumbnail MIP: the coarsest whose larger side is at least this
THUMB_MAX_SIDE = 1024  # thumbnails are downscaled to at most this (when the pyramid stops early)
SLAB_SECTIONS = 32  # sections of a CPC layer read at once when looking for the worst windows
IMG_DIR = "img"
BEFORE_COLOUR = "#d62728"
AFTER_COLOUR = "#1f77b4"


# -- inputs --------------------------------------------------------------------------------------------
@dataclass
class CpcInput:
    """One CPC layer of the report ("before" = of the source, "after" = of the aligned image)."""

    name: str  # "cpc" or "cpc_source"
    path: str
    layer: Layer | None
    summaries: dict[int, dict[str, Any]] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)  # expected sections without a summary
    unscored: list[int] = field(default_factory=list)  # summaries with no scored window (no tissue)
    problems: list[str] = field(default_factory=list)  # parts of the layer that could not be read

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.layer.seamless_info.get("cpc", {})) if self.layer else {}

    @property
    def offset(self) -> int:
        return int(self.params.get("offset", 1))

    def value(self, z: int, key: str) -> float | None:
        summary = self.summaries.get(z)
        value = summary.get(key) if summary else None
        return None if value is None else float(value)


@dataclass(frozen=True)
class Window:
    """One CPC window, in MIP-0 voxels of the aligned image."""

    z: int
    score: float
    box: tuple[int, int, int, int]  # x0, y0, x1, y1
    centre: tuple[float, float]


def child(destination: str, name: str) -> str:
    return f"{normalise_path(destination)}/{name}"


def default_out_dir(destination: str) -> Path:
    """DST/report for a local destination, else ./report."""
    dst = normalise_path(destination)
    if dst.startswith("file://"):
        return Path(urlparse(dst).path) / "report"
    return Path("report")


def _exists(path: str) -> bool:
    return with_retries(lambda: _fetch_info(path), f"reading the info file of {path}") is not None


def open_inputs(source: str, destination: str) -> tuple[Layer, Layer, CpcInput, CpcInput]:
    """Open the source, the aligned image and the two CPC layers, or say what is missing and what makes it."""
    dst = normalise_path(destination)
    image_path = child(dst, "image")
    if not _exists(image_path):
        raise LayerError(
            f"--dst: no aligned image at {image_path} (its info file is missing); the alignment writes it "
            f"with its final `seamless render ... --dst {image_path}` and `seamless downsample --src {image_path}`"
            " (or run the alignment DAG); check --dst"
        )
    image = open_layer(image_path, LayerKind.IMAGE, role="--dst image")
    src = open_layer(source, LayerKind.IMAGE, role="--src")
    cpcs = []
    for name in ("cpc", "cpc_source"):
        path = child(dst, name)
        layer = open_layer(path, LayerKind.QUALITY, role=f"--dst {name}") if _exists(path) else None
        cpcs.append(CpcInput(name, path, layer))
    after, before = cpcs
    if after.layer is None and before.layer is None:
        raise LayerError(
            f"--dst: neither {after.path} nor {before.path} exists, so there is no quality to report; make them with "
            f"`seamless cpc --src {image_path} --dst {after.path} --mip M` and "
            f"`seamless cpc --src {src.path} --dst {before.path} --mip M` (same --mip and --patch)"
        )
    return src, image, after, before


def read_summaries(cpc: CpcInput, sections: Sequence[int], first_z: int) -> None:
    """Fill cpc.summaries / missing / unscored for `sections` from the layer's summary/<z>.json files."""
    if cpc.layer is None:
        return
    files = CloudFiles(cpc.path, secrets=storage_secrets(cpc.path))
    names = [f"summary/{z}.json" for z in sections]
    found = with_retries(lambda: files.get_json(names), f"reading the CPC summaries of {cpc.path}")
    for z, summary in zip(sections, found):
        if summary is None:
            if z - cpc.offset >= first_z:  # the first sections have nothing to be compared with
                cpc.missing.append(z)
            continue
        cpc.summaries[z] = summary
        if summary.get("median") is None:
            cpc.unscored.append(z)


# -- the compose steps' reports ---------------------------------------------------------------------------
def read_compose_reports(destination: str, sections: Sequence[int]) -> dict[int, dict]:
    """z -> the report its compose step left in its marker (the sections that have one)."""
    markers = Layout(destination).markers
    files = CloudFiles(markers, secrets=storage_secrets(markers))
    names = [f"{compose_step(z)}.json" for z in sections]
    found = with_retries(lambda: files.get_json(names), f"reading the compose steps' markers under {markers}")
    return {z: marker["report"] for z, marker in zip(sections, found)
            if isinstance(marker, dict) and isinstance(marker.get("report"), dict)}


def read_folds(reports: dict[int, dict]) -> dict[int, float]:
    """z -> the share of its final field that folds, for the sections whose compose marker reports one."""
    return {z: float(r["folded_share"]) for z, r in reports.items() if isinstance(r.get("folded_share"), (int, float))}


@dataclass(frozen=True)
class Drift:
    """The rigid part of a section's final field (steps/drift.py): how far it turns and shifts the section."""

    rotation_deg: float
    shift_px: float  # of the section's centre, MIP-0 pixels
    bend_px: float | None  # RMS of the field's non-rigid rest, MIP-0 pixels

    @property
    def degrees(self) -> str:
        return f"{round(self.rotation_deg, 2) + 0.0:+.2f}°"  # + 0.0: never "-0.00°"

    def text(self) -> str:
        return f"{self.degrees} / {self.shift_px:.1f} px"


def read_drift(reports: dict[int, dict]) -> dict[int, Drift]:
    """z -> its final field's rigid part, for the sections whose compose marker reports one."""
    out = {}
    for z, report in reports.items():
        rotation, shift = report.get("drift_rotation_deg"), report.get("drift_shift_px")
        bend = report.get("drift_nonrigid_rms_px")
        if isinstance(rotation, (int, float)) and isinstance(shift, (int, float)):
            out[z] = Drift(float(rotation), float(shift), float(bend) if isinstance(bend, (int, float)) else None)
    return out


# -- the worst windows ------------------------------------------------------------------------------------
def worst_windows(cpc: CpcInput, image: Layer, count: int) -> list[Window]:
    """The `count` lowest-scoring CPC windows over the sections that have a summary (NaN windows skipped)."""
    layer = cpc.layer
    if layer is None or count <= 0:
        return []
    scored = sorted(z for z, s in cpc.summaries.items() if s.get("median") is not None)
    bounds = layer.bounds(0)
    scale = [c / i for c, i in zip(layer.resolution(0)[:2], image.resolution(0)[:2])]  # MIP-0 voxels per window
    limit = image.bounds(0)
    candidates: list[tuple[float, int, int, int]] = []  # score, z, x index, y index
    for slab in _slabs(scored, SLAB_SECTIONS):
        try:
            data = layer.read(bounds.with_z(slab[0], slab[-1] + 1))[:, 0]  # (z, y, x)
        except SeamlessError as exc:  # e.g. a chunk deleted after the summary was written
            log.warning("report: skipping sections %s of %s: %s", z_list(slab), cpc.path, exc)
            cpc.problems.append(f"sections {z_list(slab)} of {cpc.path} could not be read for the worst windows: {exc}")
            continue
        for k, z in enumerate(range(slab[0], slab[-1] + 1)):
            if z not in cpc.summaries or cpc.summaries[z].get("median") is None:
                continue
            values = data[k].ravel()
            finite = np.flatnonzero(np.isfinite(values))
            if finite.size == 0:
                continue
            take = min(count, finite.size)
            lowest = finite[np.argpartition(values[finite], take - 1)[:take]]
            for flat in lowest:
                y, x = divmod(int(flat), data.shape[2])
                candidates.append((float(values[flat]), z, bounds.start[0] + x, bounds.start[1] + y))
        candidates = sorted(candidates)[:count]
    windows = []
    for score, z, xi, yi in candidates:
        x0 = max(limit.start[0], round(xi * scale[0]))
        y0 = max(limit.start[1], round(yi * scale[1]))
        x1 = min(limit.stop[0], round((xi + 1) * scale[0]))
        y1 = min(limit.stop[1], round((yi + 1) * scale[1]))
        windows.append(Window(z, score, (x0, y0, x1, y1), ((x0 + x1) / 2, (y0 + y1) / 2)))
    return windows


def _slabs(sections: Sequence[int], size: int) -> Iterable[list[int]]:
    """Runs of consecutive sections, at most `size` long."""
    run: list[int] = []
    for z in sections:
        if run and (z != run[-1] + 1 or len(run) == size):
            yield run
            run = []
        run.append(z)
    if run:
        yield run


# -- thumbnails ------------------------------------------------------------------------------------------
def choose_thumb_mip(layer: Layer, min_side: int = THUMB_MIN_SIDE) -> int:
    """The coarsest MIP whose larger side is at least `min_side` pixels (MIP 0 for small layers)."""
    chosen = layer.mips[0]
    for mip in layer.mips:
        if max(layer.bounds(mip).size[:2]) >= min_side:
            chosen = mip
    return chosen


def matching_mip(layer: Layer, resolution: Sequence[float]) -> int:
    """The coarsest MIP of `layer` that is no coarser than `resolution` in x and y."""
    chosen = layer.mips[0]
    for mip in layer.mips:
        res = layer.resolution(mip)
        if res[0] <= resolution[0] + 1e-9 and res[1] <= resolution[1] + 1e-9:
            chosen = mip
    return chosen


class Thumbnails:
    """Whole sections of one layer at a resolution, as 8-bit arrays (cached: z-1 of one is z of another)."""

    def __init__(self, layer: Layer, resolution: Sequence[float]) -> None:
        self.layer = layer
        self.mip = matching_mip(layer, resolution)
        own = layer.resolution(self.mip)
        self.scale = (own[0] / resolution[0], own[1] / resolution[1])
        self._cache: dict[int, np.ndarray] = {}

    def section(self, z: int) -> np.ndarray:
        if z not in self._cache:
            box = self.layer.bounds(self.mip).with_z(z)
            image = to_uint8(self.layer.read(box)[0, 0])
            height, width = image.shape
            size = (max(1, round(width * self.scale[0])), max(1, round(height * self.scale[1])))
            factor = min(1.0, THUMB_MAX_SIDE / max(size))
            size = (max(1, round(size[0] * factor)), max(1, round(size[1] * factor)))
            if size != (width, height):
                from PIL import Image

                image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
            self._cache[z] = image
        return self._cache[z]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit grey values; float images are stretched over the 1st..99th percentile of their tissue."""
    if image.dtype == np.uint8:
        return image
    values = image[np.isfinite(image) & (image != 0)]
    if values.size == 0:
        return np.zeros(image.shape, np.uint8)
    lo, hi = np.percentile(values, [1, 99])
    scaled = (np.nan_to_num(image.astype(np.float64)) - lo) / max(hi - lo, 1e-12)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def overlay(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Red = section z-1, green = section z: aligned tissue is yellow, misalignment shows red/green fringes."""
    height = min(previous.shape[0], current.shape[0])
    width = min(previous.shape[1], current.shape[1])
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = previous[:height, :width]
    rgb[..., 1] = current[:height, :width]
    return rgb


# -- atomic files ----------------------------------------------------------------------------------------
def write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through `write` to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    write_atomic(path, lambda handle: Image.fromarray(array).save(handle, format="PNG"))


def plot_before_after(path: Path, sections: Sequence[int], before: CpcInput, after: CpcInput, key: str,
                      title: str, highlight: Sequence[int]) -> None:
    """A PNG line plot of one summary value per section, before and after alignment."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed (Agg)
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(9, 3.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    zs = np.asarray(sections)
    for cpc, label, colour in ((before, "before (source)", BEFORE_COLOUR), (after, "after (aligned)", AFTER_COLOUR)):
        if cpc.layer is None:
            continue
        values = np.asarray([np.nan if cpc.value(z, key) is None else cpc.value(z, key) for z in sections], float)
        axes.plot(zs, values, marker="o", markersize=3, linewidth=1.2, color=colour, label=label)
    for k, z in enumerate(highlight):
        axes.axvline(z, color="#ff7f0e", alpha=0.35, linewidth=2, label="worst sections" if k == 0 else None)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("section z")
    axes.set_ylabel(f"CPC {key}")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left", fontsize="small")
    if len(zs):
        axes.set_xlim(zs.min() - 0.5, zs.max() + 0.5)
    write_atomic(path, lambda handle: figure.savefig(handle, format="png"))


# -- the report ------------------------------------------------------------------------------------------
@dataclass
class SectionView:
    """Thumbnails (paths relative to the page) or the reason there are none, for one worst section."""

    z: int
    previous: int
    images: dict[str, str] = field(default_factory=dict)  # e.g. "source z-1" -> img/...
    problems: list[str] = field(default_factory=list)


def build_report(source: str, destination: str, out_dir: Path, *, z_range: tuple[int, int] | None = None,
                 thumb_mip: int | None = None, worst: int = 5, serve_root: str | None = None) -> Path:
    """Write out_dir/index.html (and its PNGs under out_dir/img/) for an alignment; return the page's path."""
    if worst < 1:
        raise InputError(f"--worst must be at least 1, got {worst}")
    src, image, after, before = open_inputs(source, destination)
    bounds = image.bounds(0)
    if z_range is not None:
        check_within(image, bounds.with_z(*z_range), "--z")
        bounds = bounds.with_z(*z_range)
    sections = list(bounds.z_range)
    first_z = image.bounds(0).start[2]
    for cpc in (after, before):
        read_summaries(cpc, sections, first_z)
    if thumb_mip is not None:
        image.scale(thumb_mip)  # a clear error for a MIP the aligned image does not have
    mip = choose_thumb_mip(image) if thumb_mip is None else thumb_mip

    ranked_by = after if after.summaries else before
    ranked = sorted((z for z in sections if ranked_by.value(z, "median") is not None),
                    key=lambda z: (ranked_by.value(z, "median"), z))
    worst_sections = ranked[:worst]
    windows = worst_windows(after, image, worst)
    compose_reports = read_compose_reports(destination, sections)
    folds, drift = read_folds(compose_reports), read_drift(compose_reports)
    log.info("report: %d sections, worst %s, %d worst windows", len(sections), worst_sections, len(windows))

    out_dir = Path(out_dir)
    img_dir = out_dir / IMG_DIR
    img_dir.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()

    def png_name(name: str) -> str:
        written.add(name)
        return f"{IMG_DIR}/{name}"

    plots = {}
    for key, title in (("median", "median CPC per section"), ("p5", "5th-percentile CPC per section")):
        name = f"cpc_{key}.png"
        plot_before_after(img_dir / name, sections, before, after, key, title, worst_sections)
        plots[key] = png_name(name)

    resolution = image.resolution(mip)
    views = _thumbnails(src, image, worst_sections, resolution, after.offset if after.layer else before.offset,
                        first_z, img_dir, png_name)

    root = serve_root or _serve_root([src.path, image.path])
    page = _render_page(
        src=src, image=image, after=after, before=before, sections=sections, worst_sections=worst_sections,
        windows=windows, views=views, plots=plots, thumb_mip=mip, thumb_resolution=resolution,
        ranked_by=ranked_by, serve_root=root, folds=folds, drift=drift, markers=Layout(destination).markers,
    )
    index = out_dir / "index.html"
    write_atomic(index, lambda handle: handle.write(page.encode("utf-8")))
    for stale in img_dir.glob("*.png"):  # PNGs of an earlier run that this page does not show
        if stale.name not in written:
            stale.unlink(missing_ok=True)
    return index


def _thumbnails(src: Layer, image: Layer, worst_sections: Sequence[int], resolution: Sequence[float], offset: int,
                first_z: int, img_dir: Path, png_name: Callable[[str], str]) -> list[SectionView]:
    views = []
    stacks = {"source": Thumbnails(src, resolution), "aligned": Thumbnails(image, resolution)}
    for z in worst_sections:
        view = SectionView(z, z - offset)
        views.append(view)
        if view.previous < first_z:
            view.problems.append(f"section {z} has no section {view.previous} before it")
            continue
        for name, stack in stacks.items():
            try:
                previous, current = stack.section(view.previous), stack.section(z)
            except SeamlessError as exc:
                view.problems.append(f"{name} thumbnails unavailable (MIP {stack.mip}): {exc}")
                continue
            for label, array, file in (
                (f"{name} z={view.previous}", previous, f"{name}_z{view.previous}_mip{stack.mip}.png"),
                (f"{name} z={z}", current, f"{name}_z{z}_mip{stack.mip}.png"),
                (f"{name} overlay", overlay(previous, current), f"{name}_overlay_z{view.previous}_z{z}_mip{stack.mip}.png"),
            ):
                save_png(img_dir / file, array)
                view.images[label] = png_name(file)
    return views


def _serve_root(paths: Sequence[str]) -> str | None:
    """The folder `seamless serve` must serve so that every local layer of the page is reachable."""
    local = [os.path.dirname(urlparse(p).path) for p in paths if p.startswith("file://")]
    return os.path.commonpath(local) if local else None


# -- HTML ------------------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
tr.worst td { background: #fde2e2; font-weight: 600; }
.up { color: #1a7f37; } .down { color: #c62828; } .na { color: #999; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.4em 0.8em; margin: 0.6em 0; }
.thumbs { display: flex; flex-wrap: wrap; gap: 0.6em; } .thumbs figure { margin: 0; }
.thumbs img { width: 240px; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 0.8em; color: #555; text-align: center; }
img.plot { max-width: 100%; }
.block { border: 1px solid #e0e0e0; padding: 0.6em 1em; margin: 1em 0; border-radius: 4px; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def z_list(values: Sequence[int]) -> str:
    """'3, 5–7, 10' for [3, 5, 6, 7, 10]."""
    parts = []
    for run in _slabs(sorted(values), len(values) or 1):
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}–{run[-1]}")
    return ", ".join(parts)


def _stats(cpc: CpcInput, sections: Sequence[int]) -> str:
    if cpc.layer is None:
        return '<span class="na">no layer</span>'
    medians = [cpc.value(z, "median") for z in sections]
    values = [v for v in medians if v is not None]
    if not values:
        return '<span class="na">no scored section</span>'
    return (f"mean {fmt(float(np.mean(values)))}, median {fmt(float(np.median(values)))} "
            f"of {len(values)} per-section medians")


def _percent(share: float | None) -> str:
    return "—" if share is None else f"{100 * share:.1f} %"


def _no_compose_reports(status: str, markers: str) -> str:
    """A header cell for figures that come from the compose steps' markers, when there are none."""
    return (f'<span class="na">{esc(status)}</span>' + esc(f": no compose step reports under {markers} "
            "(`seamless align` and the DAGs leave them there)"))


def _fold_stats(folds: dict[int, float], sections: Sequence[int], markers: str) -> str:
    """The header's fold figures: the mean share, and the sections above the steps' warning."""
    shares = [folds[z] for z in sections if z in folds]
    if not shares:
        return _no_compose_reports("not counted", markers)
    above = [z for z in sections if folds.get(z, 0.0) > FOLD_WARNING_SHARE]
    text = (f"the final field folds on {_percent(float(np.mean(shares)))} of its pixels (mean of {len(shares)} "
            f"sections, most {_percent(max(shares))}); above {_percent(FOLD_WARNING_SHARE)}: "
            + (f"sections {z_list(above)}" if above else "none"))
    return esc(text) + " (where the render shows tissue twice: docs/estimators.md, “Folds”)"


def _pixels(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} px"


def _drift_stats(drift: dict[int, Drift], sections: Sequence[int], markers: str) -> str:
    """The header's drift figures: the sections the final fields turn and shift the most."""
    known = [z for z in sections if z in drift]
    if not known:
        return _no_compose_reports("not reported", markers)
    turned = max(known, key=lambda z: (abs(drift[z].rotation_deg), -z))
    shifted = max(known, key=lambda z: (drift[z].shift_px, -z))
    bends = [drift[z].bend_px for z in known if drift[z].bend_px is not None]
    return esc(f"the final fields turn the sections by up to {drift[turned].degrees} (section {turned}) "
               f"and shift their centres by up to {drift[shifted].shift_px:.1f} px at MIP 0 (section {shifted}), "
               f"against the source ({len(known)} sections)"
               + (f"; beyond that rigid part they bend them by {float(np.median(bends)):.1f} px RMS (median over "
                  f"the sections, most {max(bends):.1f} px)" if bends else "")) + \
        " (a serial aligner follows the content, so a long stack can turn: docs/estimators.md, “Drift”)"


def _link(label: str, url: str) -> str:
    return f'<a href="{esc(url)}">{esc(label)}</a>'


def _render_page(*, src: Layer, image: Layer, after: CpcInput, before: CpcInput, sections: Sequence[int],
                 worst_sections: Sequence[int], windows: Sequence[Window], views: Sequence[SectionView],
                 plots: dict[str, str], thumb_mip: int, thumb_resolution: Sequence[float], ranked_by: CpcInput,
                 serve_root: str | None, folds: dict[int, float], drift: dict[int, Drift], markers: str) -> str:
    def centre(layer: Layer) -> tuple[float, float]:
        b = layer.bounds(0)
        return (b.start[0] + b.size[0] / 2, b.start[1] + b.size[1] / 2)

    def links(z: int, both: bool = False) -> str:
        """Links to section z (at its centre) in the source and in the aligned image, and optionally both."""
        (sx, sy), (ax, ay) = centre(src), centre(image)
        urls = [
            ("source", viewer_link([("source", src.path)], position=(sx, sy, z + 0.5), serve_root=serve_root)),
            ("aligned", viewer_link([("aligned", image.path)], position=(ax, ay, z + 0.5), serve_root=serve_root)),
        ]
        if both:
            urls.append(("both", viewer_link([("aligned", image.path), ("source", src.path)],
                                             position=(ax, ay, z + 0.5), serve_root=serve_root)))
        return " ".join(_link(label, url) for label, url in urls)

    def change(z: int) -> tuple[float | None, str]:
        a, b = after.value(z, "median"), before.value(z, "median")
        if a is None or b is None:
            return None, "na"
        return a - b, "up" if a >= b else "down"

    worst_set = set(worst_sections)
    out: list[str] = []
    w = out.append
    w("<!DOCTYPE html>")
    w('<html lang="en"><head><meta charset="utf-8">')
    w(f"<title>{esc('Alignment report: ' + image.path)}</title>")
    w(f"<style>{CSS}</style></head><body>")
    w("<h1>Alignment quality report</h1>")

    # header
    cpc_params = after.params or before.params
    w('<table id="summary">')
    rows = [
        ("Source", esc(src.path)),
        ("Destination", esc(image.path.rsplit("/", 1)[0])),
        ("Sections", esc(f"{sections[0]}–{sections[-1]} ({len(sections)} sections)") if sections else "none"),
        ("Generated", esc(datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))),
        ("CPC", esc(f"Pearson r of section z with z−{cpc_params.get('offset', 1)} in {cpc_params.get('patch', '?')} px "
                    f"windows at MIP {cpc_params.get('mip', '?')}; 1 is identical, 0 unrelated") if cpc_params else "—"),
        ("CPC before (source)", _stats(before, sections)),
        ("CPC after (aligned)", _stats(after, sections)),
        ("Folds", _fold_stats(folds, sections, markers)),
        ("Drift", _drift_stats(drift, sections, markers)),
    ]
    for key, value in rows:
        w(f'<tr><th class="text">{esc(key)}</th><td class="text">{value}</td></tr>')
    w("</table>")

    notes = _notes(src, image, after, before, sections, serve_root)
    for note in notes:
        w(f'<p class="note">{note}</p>')

    # plots
    w('<h2 id="plots">CPC per section</h2>')
    for key, alt in (("median", "median CPC before and after per section"),
                     ("p5", "5th-percentile CPC before and after per section")):
        w(f'<p><img class="plot" src="{esc(plots[key])}" alt="{esc(alt)}"></p>')

    # worst sections
    w('<h2 id="worst-sections-title">Worst sections</h2>')
    basis = "after alignment" if ranked_by is after else "before alignment (there is no CPC of the aligned image)"
    w(f"<p>The {len(worst_sections)} sections with the lowest median CPC {esc(basis)}, worst first. "
      f"Thumbnails at {esc(_res(thumb_resolution))} (aligned MIP {thumb_mip}); in the overlays section z−1 is red "
      "and section z green: aligned tissue looks yellow, misalignment shows as red/green fringes.</p>")
    w('<div id="worst-sections">')
    views_by_z = {v.z: v for v in views}
    for rank, z in enumerate(worst_sections, 1):
        delta, cls = change(z)
        w(f'<div class="block worst-section" data-z="{z}">')
        w(f"<h3>#{rank}: section {z}</h3>")
        w(f"<p>median before {fmt(before.value(z, 'median'))}, after {fmt(after.value(z, 'median'))} "
          f'(<span class="{cls}">{fmt(delta, signed=True)}</span>); 5th percentile before '
          f"{fmt(before.value(z, 'p5'))}, after {fmt(after.value(z, 'p5'))}"
          + (f"; the final field folds on {_percent(folds[z])}" if z in folds else "")
          + (f"; it turns the section by {drift[z].degrees} and shifts its centre by "
             f"{drift[z].shift_px:.1f} px" if z in drift else "")
          + f". Neuroglancer: {links(z, both=True)}</p>")
        view = views_by_z.get(z)
        if view:
            for problem in view.problems:
                w(f'<p class="note">{esc(problem)}</p>')
            for stack in ("source", "aligned"):
                figures = [(label, path) for label, path in view.images.items() if label.startswith(stack)]
                if not figures:
                    continue
                w('<div class="thumbs">')
                for label, path in figures:
                    caption = label.replace("source", "before: source").replace("aligned", "after: aligned")
                    w(f'<figure><img src="{esc(path)}" alt="{esc(caption)}"><figcaption>{esc(caption)}'
                      "</figcaption></figure>")
                w("</div>")
        w("</div>")
    if not worst_sections:
        w('<p class="na">No section has a CPC score.</p>')
    w("</div>")

    # worst windows
    w('<h2 id="worst-windows-title">Worst windows</h2>')
    if after.layer is None:
        w(f'<p class="na">No {esc(after.path)} layer, so no windows of the aligned image to rank.</p>')
    else:
        w(f"<p>The {len(windows)} lowest-scoring CPC windows of {esc(after.path)} across the sections, in MIP-0 "
          "voxels of the aligned image (x, y is the window's centre).</p>")
        w('<table id="worst-windows"><tr><th>rank</th><th>z</th><th>x</th><th>y</th><th class="text">window '
          "x0,y0:x1,y1</th><th>CPC</th><th class=\"text\">Neuroglancer</th></tr>")
        for rank, win in enumerate(windows, 1):
            x0, y0, x1, y1 = win.box
            cx, cy = win.centre
            url = viewer_link([("aligned", image.path), ("source", src.path), ("cpc", after.path)],
                              position=(cx, cy, win.z + 0.5), serve_root=serve_root)
            w(f'<tr data-z="{win.z}"><td>{rank}</td><td>{win.z}</td><td>{cx:g}</td><td>{cy:g}</td>'
              f'<td class="text">{x0},{y0}:{x1},{y1}</td><td>{fmt(win.score)}</td>'
              f'<td class="text">{_link("aligned + source + cpc", url)}</td></tr>')
        w("</table>")

    # every section
    w('<h2 id="sections-title">Every section</h2>')
    w('<table id="sections"><tr><th>z</th><th>median before</th><th>median after</th><th>change</th>'
      '<th>p5 before</th><th>p5 after</th><th>folds</th><th class="text">turn / shift</th><th>bend</th>'
      '<th class="text">Neuroglancer</th></tr>')
    for z in sections:
        delta, cls = change(z)
        row_cls = ' class="worst"' if z in worst_set else ""
        w(f'<tr data-z="{z}"{row_cls}><td>{z}</td>'
          f'<td class="median-before">{fmt(before.value(z, "median"))}</td>'
          f'<td class="median-after">{fmt(after.value(z, "median"))}</td>'
          f'<td class="change {cls}">{fmt(delta, signed=True)}</td>'
          f'<td class="p5-before">{fmt(before.value(z, "p5"))}</td>'
          f'<td class="p5-after">{fmt(after.value(z, "p5"))}</td>'
          f'<td class="folds">{_percent(folds.get(z))}</td>'
          f'<td class="drift text">{esc(drift[z].text()) if z in drift else "—"}</td>'
          f'<td class="bend">{_pixels(drift[z].bend_px if z in drift else None)}</td>'
          f'<td class="text">{links(z)}</td></tr>')
    w("</table>")
    w("</body></html>")
    return "\n".join(out) + "\n"


def _res(resolution: Sequence[float]) -> str:
    return "×".join(f"{r:g}" for r in resolution[:2]) + " nm/px"


def _notes(src: Layer, image: Layer, after: CpcInput, before: CpcInput, sections: Sequence[int],
           serve_root: str | None) -> list[str]:
    """Notes as HTML: missing layers and sections, mismatched CPC settings, how to view local layers."""
    notes = []
    first_z = image.bounds(0).start[2]
    offset = after.offset if after.layer else before.offset
    unpaired = [z for z in sections if z - offset < first_z]
    if unpaired:
        plural = "s" if len(unpaired) > 1 else ""
        notes.append(esc(f"Not scored by CPC: section{plural} {z_list(unpaired)} (no section {offset} before "
                         "to compare with)."))
    for cpc, layer_src, what in ((after, image.path, "aligned image"), (before, src.path, "source")):
        mip = (after.params or before.params).get("mip", "M")
        patch = (after.params or before.params).get("patch", 64)
        command = f"seamless cpc --src {layer_src} --dst {cpc.path} --mip {mip} --patch {patch}"
        if cpc.layer is None:
            notes.append(esc(f"No CPC of the {what}: {cpc.path} does not exist; make it with ") + _code(command) + ".")
            continue
        if cpc.missing:
            plural = "s" if len(cpc.missing) > 1 else ""
            z_arg = f" --z {min(cpc.missing)}:{max(cpc.missing) + 1}"
            notes.append(esc(f"CPC of the {what} ({cpc.path}) is missing section{plural} {z_list(cpc.missing)}; "
                             "make them with ") + _code(command + z_arg) + ".")
        if cpc.unscored:
            notes.append(esc(f"CPC of the {what}: no scored window in section{'s' if len(cpc.unscored) > 1 else ''} "
                             f"{z_list(cpc.unscored)} (too little tissue there or in the section before)."))
        for problem in cpc.problems:
            notes.append(esc(problem))
    if after.layer is not None and before.layer is not None:
        a, b = after.params, before.params
        differ = [k for k in ("mip", "patch", "offset") if a.get(k) != b.get(k)]
        if differ:
            notes.append(esc("The two CPC layers differ in " + ", ".join(f"{k} ({b.get(k)} before, {a.get(k)} after)"
                                                                          for k in differ)
                             + "; before and after are not directly comparable."))
    if serve_root:
        notes.append("Local layers: run " + _code(f"seamless serve {serve_root}")
                     + " before opening the Neuroglancer links.")
    return notes


def _code(text: str) -> str:
    return f"<code>{esc(text)}</code>"
