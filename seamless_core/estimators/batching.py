"""Several chunk pairs as one batch, so one estimator call fills the device instead of one small chunk.

Why: on a GPU a 256² chunk leaves most of the device idle and the finetuner's time goes to kernel
launches; N chunks stacked along the batch dimension cost about as much as one. Chunks differ in size
(volume edges) and in where their source window sits (the coarser field pulls from different places), so
`stack_pairs` lays each pair on a common canvas: targets at the top-left corner (zeros elsewhere, which
carry no tissue and so never pull a field), sources shifted so that every pair shares one offset, inits
edge-extended. `split_fields` crops each pair's field back out.

The estimators treat batch members independently except where they share one schedule: the finetuner
stops when the batch's mean loss plateaus (not each member's), so a batched field differs from the
unbatched one by a small fraction of a pixel (measured in tests/test_compute_field.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Pair

__all__ = ["stack_pairs", "split_fields"]


def _canvas(parts: Sequence[Tensor], corners: Sequence[tuple[int, int]], height: int, width: int) -> Tensor:
    """Zero canvas (N, C, height, width) with parts[i] pasted at corners[i] = (y, x)."""
    first = parts[0]
    out = first.new_zeros((len(parts), first.shape[1], height, width))
    for i, (part, (y, x)) in enumerate(zip(parts, corners)):
        out[i : i + 1, :, y : y + part.shape[-2], x : x + part.shape[-1]] = part
    return out


def _extend(field: Tensor, height: int, width: int) -> Tensor:
    """Edge-extend a field (1, 2, h, w) to (height, width): no artificial step for a smoothness term."""
    ph, pw = height - field.shape[-2], width - field.shape[-1]
    return F.pad(field, (0, pw, 0, ph), mode="replicate") if ph or pw else field


def stack_pairs(pairs: Sequence[Pair], inits: Sequence[Tensor]) -> tuple[Pair, Tensor, list[tuple[int, int]]]:
    """One batched Pair and init from single-member pairs; returns the members' target sizes too."""
    if not pairs or len(pairs) != len(inits):
        raise ValueError("stack_pairs needs as many inits as pairs, at least one")
    if any(p.tgt.shape[0] != 1 for p in pairs):
        raise ValueError("stack_pairs takes single-member pairs (N = 1)")
    sizes = [p.shape for p in pairs]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    ox, oy = max(p.offset[0] for p in pairs), max(p.offset[1] for p in pairs)
    corners = [(oy - p.offset[1], ox - p.offset[0]) for p in pairs]
    src_h = max(y + p.src.shape[-2] for p, (y, _) in zip(pairs, corners))
    src_w = max(x + p.src.shape[-1] for p, (_, x) in zip(pairs, corners))
    src_w, src_h = max(src_w, ox + width), max(src_h, oy + height)  # the target grid lies inside the window
    origin = [(0, 0)] * len(pairs)

    def masks(which: str, reference: list[Tensor], at: Sequence[tuple[int, int]], h: int, w: int) -> Tensor | None:
        found = [getattr(p, which) for p in pairs]
        if all(m is None for m in found):
            return None
        parts = [m if m is not None else torch.zeros_like(r) for m, r in zip(found, reference)]
        return _canvas(parts, at, h, w)

    batched = Pair(
        src=_canvas([p.src for p in pairs], corners, src_h, src_w),
        tgt=_canvas([p.tgt for p in pairs], origin, height, width),
        offset=(ox, oy),
        src_defects=masks("src_defects", [p.src for p in pairs], corners, src_h, src_w),
        tgt_defects=masks("tgt_defects", [p.tgt for p in pairs], origin, height, width),
    )
    init = torch.cat([_extend(i, height, width) for i in inits])
    return batched, init, sizes


def split_fields(field: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """The members' fields (1, 2, h, w) out of a batched field."""
    return [field[i : i + 1, :, :h, :w] for i, (h, w) in enumerate(sizes)]
