"""Multiscale pair alignment: the stages of a StagesSpec, coarse to fine, on two whole images in memory.

`run_stage` is the per-stage logic shared with the storage-backed, chunked compute_field step: a
stage's estimators refine the field one after the other, the first starting from the coarser stage's
field. `align_pair` adds what the step does with storage: it averages the images down to each stage's
MIP (masks with max pooling), resamples the previous stage's field with unit scaling
(`fields.resample`), and returns the final field at MIP 0. It is meant for tests, benchmarks and
small sections that fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import fields
from .base import Estimator, Pair
from .spec import StagesSpec, build_estimator, parse_stages

__all__ = ["align_pair", "downsample_image", "downsample_mask", "run_stage"]


def run_stage(pair: Pair, estimators: Sequence[Estimator], init: Tensor | None) -> Tensor:
    """Run a stage's estimator chain on one pair: each refines the total field of the one before."""
    if not estimators:
        raise ValueError("a stage needs at least one estimator")
    field = init
    for estimator in estimators:
        field = estimator(pair, field)
    return field


def downsample_image(image: Tensor, mip: int) -> Tensor:
    """Average pooling by 2^mip (partial blocks at odd edges average their real pixels)."""
    if mip == 0:
        return image
    k = 2**mip
    return F.avg_pool2d(image, k, stride=k, ceil_mode=True, count_include_pad=False)


def downsample_mask(mask: Tensor | None, mip: int) -> Tensor | None:
    """Max pooling by 2^mip: a block is masked when any of its pixels is."""
    if mask is None or mip == 0:
        return mask
    k = 2**mip
    return F.max_pool2d((mask > 0).float(), k, stride=k, ceil_mode=True)


def _as_image(name: str, data: Any, device: torch.device | None) -> Tensor:
    """(H, W), (C=1, H, W) or (N, 1, H, W) arrays or tensors -> float (N, 1, H, W); uint8 is / 255."""
    if isinstance(data, np.ndarray):
        is_uint8 = data.dtype == np.uint8
        data = torch.from_numpy(np.ascontiguousarray(data))
    elif isinstance(data, Tensor):
        is_uint8 = data.dtype == torch.uint8
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(data).__name__}")
    while data.dim() < 4:
        data = data.unsqueeze(0)
    if data.dim() != 4 or data.shape[1] != 1:
        raise ValueError(f"{name} must be (H, W), (1, H, W) or (N, 1, H, W), got shape {tuple(data.shape)}")
    data = data.to(device=device) if device is not None else data
    return data.float() / 255.0 if is_uint8 else data.float()


def _fit(field: Tensor, height: int, width: int) -> Tensor:
    """Crop or edge-extend a field to (height, width) (sizes differ by a pixel at odd edges)."""
    field = field[..., :height, :width]
    ph, pw = height - field.shape[-2], width - field.shape[-1]
    if ph or pw:
        field = F.pad(field, (0, pw, 0, ph), mode="replicate")
    return field


def align_pair(
    src: Any,
    tgt: Any,
    stages: StagesSpec | list | dict | None = None,
    *,
    src_defects: Any = None,
    tgt_defects: Any = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The pull field (N, 2, H, W) at MIP 0 that aligns `src` onto `tgt`: warp(src, field) ~ tgt.

    src, tgt: MIP-0 images of the same size, float in [0, 1] (uint8 is divided by 255); 0 = no tissue.
    stages: a StagesSpec, or its list/dict form (validated), or None for the defaults.
    src_defects, tgt_defects: optional MIP-0 masks, nonzero = defect.
    """
    spec = stages if isinstance(stages, StagesSpec) else parse_stages(stages)
    device = torch.device(device) if device is not None else None
    src_t = _as_image("src", src, device)
    tgt_t = _as_image("tgt", tgt, device)
    if src_t.shape[-2:] != tgt_t.shape[-2:]:
        raise ValueError(f"src {tuple(src_t.shape)} and tgt {tuple(tgt_t.shape)} must have the same size")
    dev = tgt_t.device
    src_t = src_t.to(dev)
    masks = [
        None if m is None else _as_image(name, m, dev)
        for name, m in (("src_defects", src_defects), ("tgt_defects", tgt_defects))
    ]
    height, width = tgt_t.shape[-2:]
    field: Tensor | None = None
    previous_mip: int | None = None
    for stage in spec.stages:
        mip = stage.mip
        pair = Pair(
            src=downsample_image(src_t, mip),
            tgt=downsample_image(tgt_t, mip),
            src_defects=downsample_mask(masks[0], mip),
            tgt_defects=downsample_mask(masks[1], mip),
        )
        h, w = pair.shape
        if field is None:
            init = None
        else:
            init = _fit(fields.resample(field, previous_mip, mip), h, w)
        estimators = [build_estimator(e) for e in stage.estimators]
        field = run_stage(pair, estimators, init)
        previous_mip = mip
    assert field is not None and previous_mip is not None
    return _fit(fields.resample(field, previous_mip, 0), height, width)
