"""cpc: chunked Pearson correlation of each section against the one before it, the quality map.

Each output voxel is the correlation of one `patch` x `patch` window of section z with the same window
of section z-1 at `mip`. Pixels that are 0 in either section (no tissue, masked out) are left out;
windows with too little tissue are NaN. Per section, a summary (median, mean, 5th percentile, worst
window) is written next to the layer (summary/<z>.json) and logged, so a scientist or a task log can
rank sections without opening the volume.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from cloudvolume.lib import jsonify

from ..devices import resolve_device
from ..errors import InputError
from ..geometry import BBox, RegionRequest, chunk_grid, requested_region
from ..pipeline import run_chunks
from ..progress import Progress, StepReport
from ..volumes import Layer, LayerKind, check_within, create_from_info, make_image_info, open_layer, put_whole
from .common import to_tensor

log = logging.getLogger("seamless.cpc")
MIN_TISSUE = 0.5  # a window needs half its pixels to be tissue in both sections to be scored


@dataclass(frozen=True)
class CpcParams:
    mip: int
    patch: int = 64
    offset: int = 1  # compare z with z - offset
    chunk_windows: int = 64  # output voxels per chunk side
    device: str = "cpu"
    fill_missing: bool = False
    prefetch: int = 2


def patch_correlation(a: torch.Tensor, b: torch.Tensor, patch: int) -> torch.Tensor:
    """Pearson r of a and b (N, 1, H, W) in non-overlapping patch windows, over tissue pixels only."""
    valid = ((a > 0) & (b > 0)).to(a.dtype)
    count = F.avg_pool2d(valid, patch, ceil_mode=True)
    safe = count.clamp_min(1e-12)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x * valid, patch, ceil_mode=True) / safe

    mean_a, mean_b = mean(a), mean(b)
    var_a = (mean(a * a) - mean_a**2).clamp_min(0)
    var_b = (mean(b * b) - mean_b**2).clamp_min(0)
    cov = mean(a * b) - mean_a * mean_b
    denom = torch.sqrt(var_a * var_b)
    r = (cov / denom.clamp_min(1e-12)).clamp(-1, 1)
    usable = (count >= MIN_TISSUE) & (denom > 1e-6)
    return torch.where(usable, r, torch.full_like(r, float("nan")))


def summarise(values: np.ndarray, z: int) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"z": z, "windows": int(values.size), "scored": 0, "median": None, "mean": None, "p5": None, "min": None}
    return {
        "z": z,
        "windows": int(values.size),
        "scored": int(finite.size),
        "median": round(float(np.median(finite)), 4),
        "mean": round(float(finite.mean()), 4),
        "p5": round(float(np.percentile(finite, 5)), 4),
        "min": round(float(finite.min()), 4),
    }


def cpc(src: Layer, dst: Layer, region: BBox, params: CpcParams, *,
        progress_interval: float | None = None) -> StepReport:
    """Write the CPC map for sections in `region` (at params.mip) and return per-section summaries."""
    device = resolve_device(params.device)
    first = src.bounds(params.mip).start[2]
    sections = [z for z in region.z_range if z - params.offset >= first]
    out_region = _window_box(region, params.patch)
    chunks = [
        chunk
        for z in sections
        for chunk in chunk_grid(out_region.with_z(z), (params.chunk_windows, params.chunk_windows, 1),
                                dst.voxel_offset(0), dst.bounds(0))
    ]
    results: dict[int, list[np.ndarray]] = {z: [] for z in sections}

    def load(chunk: BBox) -> tuple[torch.Tensor, torch.Tensor]:
        box = BBox((chunk.start[0] * params.patch, chunk.start[1] * params.patch, chunk.start[2]),
                   (chunk.stop[0] * params.patch, chunk.stop[1] * params.patch, chunk.stop[2]), params.mip)
        box = box.intersection(src.bounds(params.mip).with_z(chunk.start[2]))
        prev = box.translated((0, 0, -params.offset))
        return to_tensor(src.read(box), device), to_tensor(src.read(prev), device)

    def compute(chunk: BBox, pair: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
        r = patch_correlation(pair[0], pair[1], params.patch).cpu().numpy().astype(np.float32)
        r = r[..., : chunk.size[1], : chunk.size[0]]
        results[chunk.start[2]].append(r.ravel())
        return r

    progress = Progress("cpc", len(chunks), interval=progress_interval)
    run_chunks(chunks, load, compute, dst.write, progress, prefetch=params.prefetch,
               pixels=lambda c: c.size[0] * c.size[1] * params.patch**2)
    report = progress.close()
    summaries = []
    for z in sections:
        summary = summarise(np.concatenate(results[z]) if results[z] else np.array([]), z)
        summaries.append(summary)
        put_whole(dst.path, f"summary/{summary['z']}.json", jsonify(summary).encode(), f"writing CPC summary z={z}")
        log.info("cpc %s", ", ".join(f"{k}={v}" for k, v in summary.items()))
    report.details.update({"mip": params.mip, "patch": params.patch, "sections": summaries})
    return report


def _window_box(region: BBox, patch: int) -> BBox:
    return BBox((region.start[0] // patch, region.start[1] // patch, region.start[2]),
                (math.ceil(region.stop[0] / patch), math.ceil(region.stop[1] / patch), region.stop[2]), 0)


def prepare_cpc(src_path: str, dst_path: str, region: RegionRequest, params: CpcParams) -> tuple[Layer, Layer, BBox]:
    resolve_device(params.device)
    if params.patch < 4:
        raise InputError(f"--patch {params.patch} is too small for a correlation; use 16 or more")
    if params.offset < 1:
        raise InputError(f"--offset must be >= 1, got {params.offset}")
    src = open_layer(src_path, LayerKind.IMAGE, fill_missing=params.fill_missing, role="--src")
    bounds = src.bounds(params.mip)
    region = requested_region(region, bounds)
    check_within(src, region, "--src")
    window_bounds = _window_box(bounds, params.patch)
    resolution = src.resolution(params.mip)
    info = make_image_info(
        dtype="float32",
        resolution=(resolution[0] * params.patch, resolution[1] * params.patch, resolution[2]),
        size=window_bounds.size,
        voxel_offset=window_bounds.start,
        chunk_xy=params.chunk_windows,
        kind=LayerKind.QUALITY,
    )
    info["seamless"]["cpc"] = {"source": src.path, "mip": params.mip, "patch": params.patch, "offset": params.offset}
    dst = create_from_info(dst_path, info, LayerKind.QUALITY)
    return src, dst, region
