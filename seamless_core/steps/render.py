"""render: warp an image through a field, chunk by chunk, with no seams at chunk borders.

Each output chunk reads its field first, then exactly the source region that the field pulls from
(the bounding box of p + f(p), plus one pixel for bilinear interpolation). A displacement larger than
a chunk therefore still pulls the right pixels; only regions beyond `max_reach` are refused, loudly,
instead of being clipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import fields
from ..devices import resolve_device
from ..errors import DisplacementTooLarge, InputError
from ..geometry import BBox
from ..pipeline import run_chunks
from ..progress import Progress, StepReport
from ..volumes import SOURCE_CACHE_BYTES, Layer, LayerKind, check_same_grid, check_within, create_layer, open_layer
from .common import check_processing_chunk, processing_chunks, read_field, read_mask, to_numpy, to_tensor


@dataclass(frozen=True)
class RenderParams:
    mip: int
    field_mip: int | None = None  # defaults to `mip`; a coarser field is upsampled on the fly
    mask_mip: int | None = None  # defaults to `mip`
    chunk_xy: int | None = None  # processing chunk; a multiple of the destination's storage chunk
    max_reach: int = 4096  # most pixels (at `mip`) the source region may extend beyond a chunk per side
    device: str = "cpu"
    fill_missing: bool = False
    prefetch: int = 2


@dataclass(frozen=True)
class SourceWindow:
    """What one output chunk needs: its field and the source pixels the field pulls from."""

    field: torch.Tensor
    image: torch.Tensor
    origin: BBox  # where `image` sits in the source volume
    mask: torch.Tensor | None


def source_region(chunk: BBox, field: torch.Tensor) -> BBox:
    """Bounding box of the source pixels that bilinear sampling at p + f(p) touches for this chunk."""
    fx, fy = field[:, 0], field[:, 1]
    x0 = chunk.start[0] + math.floor(float(fx.min()))
    y0 = chunk.start[1] + math.floor(float(fy.min()))
    x1 = chunk.stop[0] - 1 + math.floor(float(fx.max())) + 2
    y1 = chunk.stop[1] - 1 + math.floor(float(fy.max())) + 2
    return BBox((x0, y0, chunk.start[2]), (x1, y1, chunk.stop[2]), chunk.mip)


def render_chunk(window: SourceWindow, chunk: BBox) -> torch.Tensor:
    """Warp one chunk: sample the source window at p + f(p), then black out warped defects."""
    offset = torch.tensor(
        [chunk.start[0] - window.origin.start[0], chunk.start[1] - window.origin.start[1]],
        dtype=window.field.dtype,
        device=window.field.device,
    ).view(1, 2, 1, 1)
    grid = fields.pixel_grid(chunk.size[1], chunk.size[0], device=window.field.device, dtype=window.field.dtype)
    coords = torch.add(window.field, grid).add_(offset)  # one allocation on the hot path
    out = fields.sample(window.image, coords)
    if window.mask is not None:
        out = out.masked_fill(fields.sample_mask(window.mask, coords, rule="any"), 0.0)
    return out


def render(
    src: Layer,
    field: Layer,
    dst: Layer,
    region: BBox,
    params: RenderParams,
    *,
    mask: Layer | None = None,
    progress_interval: float | None = None,
) -> StepReport:
    """Render `region` (at params.mip) of `src` through `field` into `dst`."""
    device = resolve_device(params.device)
    chunks = processing_chunks(dst, region, params.chunk_xy)
    field_mip = params.mip if params.field_mip is None else params.field_mip
    mask_mip = params.mip if params.mask_mip is None else params.mask_mip

    def load(chunk: BBox) -> SourceWindow:
        displacement = read_field(field, chunk, field_mip, device)
        origin = source_region(chunk, displacement)
        reach = max(chunk.start[0] - origin.start[0], origin.stop[0] - chunk.stop[0],
                    chunk.start[1] - origin.start[1], origin.stop[1] - chunk.stop[1])
        if reach > params.max_reach:
            raise DisplacementTooLarge(
                f"field {field.path} pulls pixels {reach} px (MIP {params.mip}) beyond chunk {chunk}, more "
                f"than the render's reach of {params.max_reach} px; check that field (max displacement "
                f"{fields.max_displacement(displacement):.0f} px) or raise --max-reach"
            )
        image = to_tensor(src.read(origin), device)
        defects = read_mask(mask, origin, mask_mip, device) if mask is not None else None
        return SourceWindow(displacement, image, origin, defects)

    def compute(chunk: BBox, window: SourceWindow) -> np.ndarray:
        return to_numpy(render_chunk(window, chunk), dst.dtype)

    progress = Progress("render", len(chunks), interval=progress_interval)
    run_chunks(chunks, load, compute, dst.write, progress, prefetch=params.prefetch)
    report = progress.close()
    report.details.update({"mip": params.mip, "field_mip": field_mip, "sections": len(region.z_range)})
    return report


def prepare_render(
    src_path: str,
    field_path: str,
    dst_path: str,
    region: BBox | None,
    params: RenderParams,
    *,
    mask_path: str | None = None,
    chunk_storage: int | None = None,
) -> tuple[Layer, Layer, Layer, Layer | None, BBox]:
    """Validate every input, then create the destination: nothing is written when validation fails."""
    resolve_device(params.device)
    src = open_layer(src_path, LayerKind.IMAGE, fill_missing=params.fill_missing, role="--src",
                     cache_bytes=SOURCE_CACHE_BYTES)
    field = open_layer(field_path, LayerKind.FIELD, role="--field")
    field_mip = params.mip if params.field_mip is None else params.field_mip
    field.scale(field_mip)
    src.scale(params.mip)
    mask = None
    if mask_path:
        mask = open_layer(mask_path, LayerKind.MASK, fill_missing=params.fill_missing, role="--mask")
        mask.scale(params.mip if params.mask_mip is None else params.mask_mip)
        check_same_grid(src, 0, mask, 0, "--src and --mask")
    check_same_grid(src, 0, field, 0, "--src and --field")
    region = region or src.bounds(params.mip)
    check_within(src, region, "--src")
    check_within(field, region.to_mip(field_mip, field.factors), "--field")
    if field_mip < params.mip:
        raise InputError(f"--field-mip {field_mip} is finer than --mip {params.mip}; it must be equal or coarser")
    check_processing_chunk(params.chunk_xy, chunk_storage or src.chunk_size(0)[0])
    dst = create_layer(dst_path, like=src, kind=LayerKind.IMAGE, max_mip=max(src.mips), dtype=src.dtype,
                       chunk_xy=chunk_storage)
    return src, field, dst, mask, region
