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
import torch.nn.functional as F

from .. import fields
from ..devices import resolve_device
from ..errors import DisplacementTooLarge, InputError, LayerError
from ..geometry import BBox, RegionRequest, reach_beyond, requested_region
from ..pipeline import run_chunks
from ..progress import Progress, StepReport
from ..volumes import (
    SOURCE_CACHE_BYTES,
    Layer,
    LayerKind,
    check_same_grid,
    check_within,
    create_layer,
    open_layer,
)
from .common import (
    check_processing_chunk,
    field_not_finite,
    processing_chunks,
    read_clamped,
    read_field,
    read_mask,
    to_numpy,
    to_tensor,
)


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
    # Threads while the render runs (None: chosen by render_threads): torch's intra-op threads of the
    # warp, and how many chunks are read (and written) at once.
    compute_threads: int | None = None
    io_threads: int | None = None
    # A section of the destination, already rendered, whose pixels replace this render's black ones
    # (outside the source, cracks, debris, masked defects): a block target whose holes do not steer
    # the fields of later sections (docs/workflow.md, "Filled targets").
    fill_holes_from: int | None = None


@dataclass(frozen=True)
class SourceWindow:
    """What one output chunk needs: its field and the source pixels the field pulls from."""

    field: torch.Tensor
    image: torch.Tensor
    origin: BBox  # where `image` sits in the source volume
    mask: torch.Tensor | None
    holes_from: np.ndarray | None = None  # the destination's fill section at this chunk, (z, c, y, x)


Extent = tuple[float, float, float, float]  # min x, max x, min y, max y of a displacement, px


def source_region(chunk: BBox, field: torch.Tensor) -> BBox:
    """Bounding box of the source pixels that bilinear sampling at p + f(p) touches for this chunk."""
    return source_box(chunk, field_extent(field))


def field_extent(field: torch.Tensor) -> Extent:
    """(min x, max x, min y, max y) of a (N, 2, H, W) displacement: one aminmax pass per channel.

    NaN propagates through min/max and infinities show as such, so a non-finite extent is also the
    finiteness check of the whole field (no separate pass).
    """
    lo_x, hi_x = torch.aminmax(field[:, 0])
    lo_y, hi_y = torch.aminmax(field[:, 1])
    return tuple(float(v) for v in torch.stack([lo_x, hi_x, lo_y, hi_y]).cpu())  # type: ignore[return-value]


def source_box(chunk: BBox, extent: Extent) -> BBox:
    """`source_region` from a precomputed extent (finite values required)."""
    lo_x, hi_x, lo_y, hi_y = extent
    x0 = chunk.start[0] + math.floor(lo_x)
    y0 = chunk.start[1] + math.floor(lo_y)
    x1 = chunk.stop[0] - 1 + math.floor(hi_x) + 2
    y1 = chunk.stop[1] - 1 + math.floor(hi_y) + 2
    return BBox((x0, y0, chunk.start[2]), (x1, y1, chunk.stop[2]), chunk.mip)


def read_displacement(
    layer: Layer, chunk: BBox, field_mip: int, device: torch.device
) -> tuple[torch.Tensor, Extent]:
    """The chunk's field (N, 2, H, W) at chunk.mip and its extent; NaN or infinity is an InputError.

    At the chunk's own MIP the field is read as is and its extent doubles as the finiteness check (one
    reduction pass instead of two); a coarser field goes through `read_field` (checked, upsampled).
    """
    if field_mip == chunk.mip:
        field = to_tensor(read_clamped(layer, chunk), device)
    else:
        field = read_field(layer, chunk, field_mip, device)
    extent = field_extent(field)
    if not all(math.isfinite(v) for v in extent):
        raise field_not_finite(layer, chunk)
    return field, extent


def image_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A source window (z, c, y, x) as float32 on `device`.

    On the CPU the conversion runs in numpy, whose freed buffers the heap hands back to the next chunk
    without page faults (a fresh 8 MiB torch CPU tensor took ~640 page faults every time, measured). A
    GPU gets the narrow dtype over the bus and converts there.
    """
    if device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True).to(torch.float32)


def _normalised_axis(size: int, offset: int, extent: int, device: torch.device) -> torch.Tensor:
    """grid_sample's normalised coordinate (align_corners=False) of pixel centres offset..offset+size-1
    in an input `extent` px wide: (2 (i + offset) + 1) / extent - 1, computed in float64."""
    axis = (np.arange(size, dtype=np.float64) + offset) * (2.0 / extent) + (1.0 / extent - 1.0)
    return torch.from_numpy(axis.astype(np.float32)).to(device)


def normalised_grid(window: SourceWindow, chunk: BBox, *, in_place: bool = False) -> torch.Tensor:
    """grid_sample's (N, H, W, 2) grid for this chunk: where p + f(p) lies in the source window.

    Built in one pass per channel straight into normalised coordinates, x_norm = f_x * 2 / W_in +
    x_norm(p), where x_norm(p) of the chunk's pixel centres is one row (and y_norm(p) one column)
    computed in float64: no pixel grid, no coordinate tensor, no interleaving copy; the result is a
    permuted view of a planar (N, 2, H, W) tensor, which grid_sample reads as fast as a contiguous grid.
    It rounds twice where field + pixels + offset, then scale and shift, rounded up to four times: closer
    to a float64 warp (on the benchmark section 7.5 k instead of 9.3 k of 16.8 M uint8 pixels round
    differently from it). `in_place` turns the window's own field into the grid (no allocation).
    """
    field = window.field if in_place else window.field.clone()
    height, width = chunk.size[1], chunk.size[0]
    in_h, in_w = window.image.shape[-2:]
    grid_x = _normalised_axis(width, chunk.start[0] - window.origin.start[0], in_w, field.device)
    grid_y = _normalised_axis(height, chunk.start[1] - window.origin.start[1], in_h, field.device)
    torch.add(grid_x.view(1, width), field[:, 0], alpha=2.0 / in_w, out=field[:, 0])
    torch.add(grid_y.view(height, 1), field[:, 1], alpha=2.0 / in_h, out=field[:, 1])
    return field.permute(0, 2, 3, 1)


def render_chunk(window: SourceWindow, chunk: BBox, *, in_place: bool = False) -> torch.Tensor:
    """Warp one chunk: sample the source window at p + f(p), then black out warped defects.

    `in_place` lets the render reuse the window's own field tensor as the grid (see normalised_grid).
    """
    defects = None
    if window.mask is not None:  # masks sample exact pixel coordinates, before the grid reuses the field
        field = window.field
        shift = [chunk.start[0] - window.origin.start[0], chunk.start[1] - window.origin.start[1]]
        offset = torch.tensor(shift, dtype=field.dtype, device=field.device).view(1, 2, 1, 1)
        grid = fields.pixel_grid(chunk.size[1], chunk.size[0], device=field.device, dtype=field.dtype)
        defects = fields.sample_mask(window.mask, torch.add(field, grid).add_(offset), rule="any")
    grid = normalised_grid(window, chunk, in_place=in_place)
    image = window.image if window.image.dtype == grid.dtype else window.image.to(grid.dtype)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if defects is not None:
        out.masked_fill_(defects, 0.0)
    return out


def to_layer_dtype(out: torch.Tensor, dtype: str) -> np.ndarray:
    """`to_numpy` for a render result: on the CPU the uint8 rounding (half to even, like torch.round)
    and clamping run in place in numpy and the cast writes a heap-reused buffer."""
    if dtype == "uint8" and out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous():
        array = out.numpy()
        np.rint(array, out=array)
        np.clip(array, 0, 255, out=array)
        return array.astype(np.uint8)
    return to_numpy(out, dtype)


def fill_holes(rendered: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """`rendered` with its black (zero) pixels taken from `previous`, in place; the same shape."""
    holes = rendered == 0
    rendered[holes] = previous[holes]
    return rendered


def read_fill_section(dst: Layer, chunk: BBox, z: int) -> np.ndarray:
    """The destination's section `z` over this chunk's xy, which must be rendered already."""
    try:
        return dst.read(chunk.with_z(z))
    except LayerError as exc:
        raise InputError(
            f"--fill-holes-from {z}: section {z} of {dst.path} is not rendered (or not readable) in "
            f"{chunk.with_z(z)}; render that section first (the plan orders it before this one). {exc}"
        ) from None


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
        displacement, extent = read_displacement(field, chunk, field_mip, device)
        origin = source_box(chunk, extent)
        reach = reach_beyond(chunk, origin)
        if reach > params.max_reach:
            raise DisplacementTooLarge(
                f"field {field.path} pulls pixels {reach} px (MIP {params.mip}) beyond chunk {chunk}, more "
                f"than the render's reach of {params.max_reach} px; check that field (max displacement "
                f"{fields.max_displacement(displacement):.0f} px) or raise --max-reach"
            )
        image = image_tensor(src.read(origin), device)
        defects = read_mask(mask, origin, mask_mip, device) if mask is not None else None
        holes_from = None
        if params.fill_holes_from is not None:
            holes_from = read_fill_section(dst, chunk, params.fill_holes_from)
        return SourceWindow(displacement, image, origin, defects, holes_from)

    def compute(chunk: BBox, window: SourceWindow) -> np.ndarray:
        rendered = to_layer_dtype(render_chunk(window, chunk, in_place=True), dst.dtype)
        return rendered if window.holes_from is None else fill_holes(rendered, window.holes_from)

    progress = Progress("render", len(chunks), interval=progress_interval)
    layers = (src, field, dst, mask) if mask is not None else (src, field, dst)
    compute_threads, io_threads = render_threads(params, device, *layers)
    run_chunks(chunks, load, compute, dst.write, progress, prefetch=params.prefetch,
               compute_threads=compute_threads, io_threads=io_threads)
    report = progress.close()
    report.details.update({"mip": params.mip, "field_mip": field_mip, "sections": len(region.z_range)})
    if params.fill_holes_from is not None:
        report.details["holes_filled_from"] = params.fill_holes_from
    return report


def render_threads(
    params: RenderParams, device: torch.device, *layers: Layer
) -> tuple[int | None, int | None]:
    """(torch threads for the warp, concurrent loads/stores) for this render.

    On file:// a load or a store is memory copies through the page cache: CPU work that needs a core
    as much as the warp does. On the CPU the cores (torch's thread count, which the CLI sets to the CPUs
    the process owns) are therefore split: up to half of them, at most `prefetch`, for I/O, the rest
    for the warp. On 2 cores that is one of each (measured on the benchmark section: 0.114 s and 0.18
    CPU-s against 0.137 s and 0.22 CPU-s for 2 torch threads with 2 readers and 2 writers). Object
    stores keep `prefetch` concurrent requests (their latency, not CPU, is what the threads hide).
    """
    if device.type != "cpu":
        return params.compute_threads, params.io_threads
    cores = torch.get_num_threads()
    io = params.io_threads
    if io is None:
        io = params.prefetch
        if all(layer.scheme == "file" for layer in layers):
            io = max(1, min(params.prefetch, cores // 2))
    compute = params.compute_threads if params.compute_threads is not None else max(1, cores - io)
    return max(1, compute), max(1, io)


def prepare_render(
    src_path: str,
    field_path: str,
    dst_path: str,
    region: RegionRequest,
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
    region = requested_region(region, src.bounds(params.mip))
    check_within(src, region, "--src")
    check_within(field, region.to_mip(field_mip, field.factors), "--field")
    if field_mip < params.mip:
        raise InputError(f"--field-mip {field_mip} is finer than --mip {params.mip}; it must be equal or coarser")
    _check_fill_section(params.fill_holes_from, region, src)
    check_processing_chunk(params.chunk_xy, chunk_storage or src.chunk_size(0)[0])
    dst = create_layer(dst_path, like=src, kind=LayerKind.IMAGE, max_mip=max(src.mips), dtype=src.dtype,
                       chunk_xy=chunk_storage)
    return src, field, dst, mask, region


def _check_fill_section(z: int | None, region: BBox, src: Layer) -> None:
    """--fill-holes-from names one other section of the volume, and the render is of one section."""
    if z is None:
        return
    if len(region.z_range) != 1:
        raise InputError(f"--fill-holes-from fills one rendered section from another: render one section at a "
                         f"time (the region spans z {region.start[2]}:{region.stop[2]})")
    bounds = src.bounds(region.mip)
    if z == region.start[2] or not bounds.start[2] <= z < bounds.stop[2]:
        raise InputError(f"--fill-holes-from {z} must be another section of the volume "
                         f"(z {bounds.start[2]}:{bounds.stop[2]}), not the rendered one ({region.start[2]})")
