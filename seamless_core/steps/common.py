"""Helpers shared by the steps: chunk plans, numpy<->torch, reading fields and masks at another MIP."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import fields
from ..errors import InputError
from ..geometry import BBox, chunk_grid
from ..volumes import Layer

DEFAULT_PROCESSING_CHUNK = 1024


def check_processing_chunk(chunk_xy: int | None, storage_xy: int) -> None:
    """Refuse a processing chunk that would cut storage chunks, before anything is created."""
    if chunk_xy is not None and (chunk_xy <= 0 or chunk_xy % storage_xy):
        raise InputError(f"--chunk {chunk_xy} must be a positive multiple of the destination's storage chunk {storage_xy}")


def processing_chunks(dst: Layer, region: BBox, chunk_xy: int | None) -> list[BBox]:
    """Chunks a step processes: multiples of the destination's storage chunks, one section each.

    Regions are expanded outward to whole storage chunks (clipped to the volume), so every write is
    aligned; the region actually written is what the chunks cover.
    """
    storage = dst.chunk_size(region.mip)
    size = chunk_xy or max(storage[0], DEFAULT_PROCESSING_CHUNK // storage[0] * storage[0])
    if size % storage[0] or size % storage[1]:
        raise InputError(
            f"--chunk {size} must be a multiple of {dst.path}'s storage chunk {storage[:2]} at MIP {region.mip}"
        )
    return list(chunk_grid(region, (size, size, 1), dst.voxel_offset(region.mip), dst.bounds(region.mip)))


def to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """(z, c, y, x) numpy -> float32 tensor on `device` (z becomes the batch axis)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)
    return tensor.to(device, non_blocking=True)


def to_numpy(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """Float tensor -> numpy of the layer's dtype; integer images are rounded and clamped (in place:
    the tensor is a step's own result, and this is the hot path of every step)."""
    if dtype == "uint8":
        tensor = tensor.round_().clamp_(0, 255).to(torch.uint8)
    elif dtype == "float32":
        tensor = tensor.to(torch.float32)
    else:  # pragma: no cover - layer validation admits only these
        raise ValueError(f"unsupported dtype {dtype}")
    return tensor.cpu().numpy()


def read_clamped(layer: Layer, box: BBox) -> np.ndarray:
    """Read `box`, replicating the volume's edge outside its bounds (fields, masks: no false zeros).

    A box wholly outside the bounds (a window that a large displacement near the volume's edge pulls
    from) reads as the nearest edge strip, replicated: what border sampling of the whole layer gives.
    """
    bounds = layer.bounds(box.mip)
    inside = box.intersection(bounds)
    if inside.is_empty:
        z_inside = bounds.start[2] <= box.start[2] and box.stop[2] <= bounds.stop[2]
        if bounds.is_empty or box.is_empty or not z_inside:
            raise InputError(f"{box} does not overlap {layer.path} (bounds {bounds})")
        (x0, y0, z0), (x1, y1, z1) = box.start, box.stop
        (bx0, by0, _), (bx1, by1, _) = bounds.start, bounds.stop
        nearest = BBox((min(max(x0, bx0), bx1 - 1), min(max(y0, by0), by1 - 1), z0),
                       (max(min(x1, bx1), bx0 + 1), max(min(y1, by1), by0 + 1), z1), box.mip)
        data = layer.read(nearest)
        ys = np.clip(np.arange(box.start[1], box.stop[1]), nearest.start[1], nearest.stop[1] - 1) - nearest.start[1]
        xs = np.clip(np.arange(box.start[0], box.stop[0]), nearest.start[0], nearest.stop[0] - 1) - nearest.start[0]
        return data[:, :, ys[:, None], xs[None, :]]
    data = layer.read(inside)
    pads = (
        inside.start[0] - box.start[0],
        box.stop[0] - inside.stop[0],
        inside.start[1] - box.start[1],
        box.stop[1] - inside.stop[1],
    )
    if any(pads):
        data = np.pad(data, ((0, 0), (0, 0), (pads[2], pads[3]), (pads[0], pads[1])), mode="edge")
    return data


def read_field(layer: Layer, box: BBox, field_mip: int, device: torch.device) -> torch.Tensor:
    """The field over `box` (at box.mip), read at `field_mip` and resampled with unit scaling.

    A coarse field is read with one pixel of context so bilinear upsampling inside `box` equals
    upsampling the whole section: chunk borders leave no seam.
    """
    if field_mip == box.mip:
        return check_finite(layer, box, to_tensor(read_clamped(layer, box), device))
    if field_mip < box.mip:
        raise InputError(
            f"field MIP {field_mip} is finer than the render MIP {box.mip}; render at MIP {field_mip} or finer"
        )
    factor = _xy_factor(layer, field_mip, box.mip)
    coarse = box.to_mip(field_mip, layer.factors).padded(1)
    field = check_finite(layer, coarse, to_tensor(read_clamped(layer, coarse), device))
    field = fields.resample(field, field_mip, box.mip)
    left = box.start[0] - coarse.start[0] * factor
    top = box.start[1] - coarse.start[1] * factor
    return field[..., top : top + box.size[1], left : left + box.size[0]].contiguous()


def check_finite(layer: Layer, box: BBox, field: torch.Tensor) -> torch.Tensor:
    """Refuse NaN or infinite displacements. aminmax, not isfinite().all(): 12x cheaper per chunk (measured)."""
    low, high = torch.aminmax(field)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        raise field_not_finite(layer, box)
    return field


def field_not_finite(layer: Layer, box: BBox) -> InputError:
    """The error for a field holding NaN or infinite displacements in `box`."""
    return InputError(f"field {layer.path} holds NaN or infinite values in {box}; recompute that section's field")


def read_mask(layer: Layer, box: BBox, mask_mip: int, device: torch.device) -> torch.Tensor:
    """A mask over `box` (at box.mip) from a mask layer at any MIP: max-pooled down or repeated up."""
    if mask_mip == box.mip:
        return to_tensor(layer.read(box), device)
    coarse = box.to_mip(mask_mip, layer.factors)
    mask = to_tensor(layer.read(coarse), device)
    if mask_mip > box.mip:
        factor = _xy_factor(layer, mask_mip, box.mip)
        mask = F.interpolate(mask, scale_factor=factor, mode="nearest")
        left = box.start[0] - coarse.start[0] * factor
        top = box.start[1] - coarse.start[1] * factor
    else:
        factor = _xy_factor(layer, box.mip, mask_mip)
        pad_x = coarse.size[0] % factor and factor - coarse.size[0] % factor
        pad_y = coarse.size[1] % factor and factor - coarse.size[1] % factor
        mask = F.max_pool2d(F.pad(mask, (0, pad_x, 0, pad_y)), factor)
        left = top = 0
    return mask[..., top : top + box.size[1], left : left + box.size[0]].contiguous()


def _xy_factor(layer: Layer, coarse_mip: int, fine_mip: int) -> int:
    ratio = layer.factors.get(coarse_mip, (2**coarse_mip,))[0] / layer.factors.get(fine_mip, (2**fine_mip,))[0]
    factor = int(round(ratio))
    if factor < 1 or not math.isclose(ratio, factor):
        raise InputError(f"{layer.path}: MIP {coarse_mip} is not an integer downsampling of MIP {fine_mip}")
    return factor
