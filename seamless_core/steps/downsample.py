"""downsample: build a MIP pyramid, one level at a time, with the right reduction per layer kind.

Images average 2x2 blocks (rounded back to the layer's dtype); masks take the max (a defect anywhere
in the block marks the coarse pixel, so masking stays conservative) or the mode; fields average and
halve their values, because a field's unit is the pixel of its own MIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tinybrain
import torch
import torch.nn.functional as F

from ..devices import resolve_device
from ..errors import InputError
from ..geometry import BBox, RegionRequest, requested_region
from ..pipeline import run_chunks
from ..progress import Progress, StepReport
from ..volumes import Layer, LayerKind, check_within, ensure_mips, open_layer
from .common import processing_chunks, read_clamped, to_numpy, to_tensor

MASK_RULES = ("max", "mode")


@dataclass(frozen=True)
class DownsampleParams:
    src_mip: int
    dst_mip: int
    mask_rule: str = "max"
    chunk_xy: int | None = None
    device: str = "cpu"
    prefetch: int = 2


def reduce_block(data: torch.Tensor, kind: LayerKind, factor: int, mask_rule: str = "max") -> torch.Tensor:
    """Downsample (N, C, H, W) by `factor` in x and y (H and W divisible by factor)."""
    if kind is LayerKind.MASK:
        if mask_rule == "max":
            return F.max_pool2d(data, factor)
        return _mode(data, factor)
    reduced = F.avg_pool2d(data, factor)
    return reduced / factor if kind is LayerKind.FIELD else reduced


def _mode(data: torch.Tensor, factor: int) -> torch.Tensor:
    """Most frequent label per block (tinybrain's COUNTLESS-style mode, the connectomics standard)."""
    out = []
    for section in data.to(torch.uint8).cpu().numpy():
        xy = np.asfortranarray(section[0].T)  # tinybrain takes (x, y)
        out.append(tinybrain.downsample_segmentation(xy, factor=(factor, factor), num_mips=1)[0].T)
    return torch.from_numpy(np.stack(out)[:, None].astype(np.float32)).to(data.device)


def downsample(layer: Layer, region: BBox, params: DownsampleParams, *,
               progress_interval: float | None = None) -> StepReport:
    """Fill MIPs src_mip+1 .. dst_mip of `layer` over `region` (given at src_mip)."""
    device = resolve_device(params.device)
    ensure_mips(layer, params.dst_mip)
    chunks_per_mip = [
        (mip, processing_chunks(layer, region.to_mip(mip, layer.factors), params.chunk_xy))
        for mip in range(params.src_mip + 1, params.dst_mip + 1)
    ]
    progress = Progress("downsample", sum(len(c) for _, c in chunks_per_mip), interval=progress_interval)
    for mip, chunks in chunks_per_mip:  # level by level: each reads the one written before
        factor = layer.factors[mip][0] // layer.factors[mip - 1][0]

        def load(chunk: BBox, prev: int = mip - 1, factor: int = factor) -> torch.Tensor:
            fine = BBox(
                (chunk.start[0] * factor, chunk.start[1] * factor, chunk.start[2]),
                (chunk.stop[0] * factor, chunk.stop[1] * factor, chunk.stop[2]),
                prev,
            )
            return to_tensor(read_clamped(layer, fine), device)

        def compute(chunk: BBox, data: torch.Tensor, factor: int = factor) -> np.ndarray:
            return to_numpy(reduce_block(data, layer.kind, factor, params.mask_rule), layer.dtype)

        run_chunks(chunks, load, compute, layer.write, progress, prefetch=params.prefetch)
    report = progress.close()
    report.details.update({"src_mip": params.src_mip, "dst_mip": params.dst_mip, "kind": layer.kind.value})
    return report


def prepare_downsample(path: str, kind: LayerKind, region: RegionRequest, params: DownsampleParams) -> tuple[Layer, BBox]:
    resolve_device(params.device)
    if params.dst_mip <= params.src_mip:
        raise InputError(f"--dst-mip {params.dst_mip} must be coarser (larger) than --mip {params.src_mip}")
    if params.mask_rule not in MASK_RULES:
        raise InputError(f"unknown mask rule {params.mask_rule!r}: use one of {', '.join(MASK_RULES)}")
    layer = open_layer(path, kind, role="--src")
    region = requested_region(region, layer.bounds(params.src_mip))
    check_within(layer, region, "--src")
    return layer, region
