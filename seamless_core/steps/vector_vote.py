"""vector_vote: combine the K fields of a section (one per target offset) into one, with a quality map.

Chunks are read with enough context for the agreement blur, voted (seamless_core.vote), cropped and
written: the voted field to a field layer, the disagreement of the winning majority (px) to a quality
layer that shows where the section's targets did not agree. The report counts the voted field's folded
pixels (steps/folds.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import InputError
from ..geometry import BBox, crop_xy
from ..pipeline import run_chunks
from ..progress import Progress, StepReport
from ..vote import vector_vote
from ..volumes import Layer, LayerKind, check_same_grid, check_within, create_layer, open_layer
from .common import check_processing_chunk, processing_chunks, read_field, to_numpy
from .folds import FoldTally


@dataclass(frozen=True)
class VoteParams:
    mip: int
    temperature: float = 1.0  # px
    blur_sigma: float = 2.0  # px
    chunk_xy: int | None = None
    device: str = "cpu"
    prefetch: int = 2


def vote_fields(candidates: list[Layer], voted: Layer, agreement: Layer, region: BBox, params: VoteParams, *,
                progress_interval: float | None = None) -> StepReport:
    device = resolve_device(params.device)
    pad = math.ceil(3 * params.blur_sigma) + 1
    chunks = processing_chunks(voted, region, params.chunk_xy)
    folds = FoldTally("vector_vote: the voted field of")

    def load(chunk: BBox) -> torch.Tensor:
        padded = chunk.padded(pad)
        return torch.stack([read_field(layer, padded, params.mip, device) for layer in candidates])

    def compute(chunk: BBox, stack: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        field, spread = vector_vote(stack, temperature=params.temperature, blur_sigma=params.blur_sigma)
        field = crop_xy(field, pad)
        folds.add(field)
        return to_numpy(field, "float32"), to_numpy(crop_xy(spread, pad), "float32")

    def store(chunk: BBox, result: tuple[np.ndarray, np.ndarray]) -> None:
        voted.write(chunk, result[0])
        agreement.write(chunk, result[1])

    progress = Progress(f"vector_vote z={region.start[2]}", len(chunks), interval=progress_interval)
    run_chunks(chunks, load, compute, store, progress, prefetch=params.prefetch)
    report = progress.close()
    report.details.update({"candidates": len(candidates), "mip": params.mip, **folds.details()})
    folds.warn_if_folded(region.start[2])
    return report


def prepare_vote(field_paths: list[str], dst_path: str, agreement_path: str, region: BBox | None, z: int,
                 params: VoteParams) -> tuple[list[Layer], Layer, Layer, BBox]:
    resolve_device(params.device)
    if len(field_paths) % 2 == 0:
        raise InputError(f"vector voting needs an odd number of candidate fields (got {len(field_paths)}): "
                         "a strict majority must exist")
    if params.temperature <= 0 or params.blur_sigma < 0:
        raise InputError("--temperature must be > 0 and --blur >= 0 (both in px)")
    candidates = [open_layer(p, LayerKind.FIELD, role=f"--field #{i + 1}") for i, p in enumerate(field_paths)]
    for other in candidates[1:]:
        check_same_grid(candidates[0], params.mip, other, params.mip, "candidate fields")
    region = (region or candidates[0].bounds(params.mip)).with_z(z)
    for layer in candidates:
        check_within(layer, region, layer.path)
    check_processing_chunk(params.chunk_xy, candidates[0].chunk_size(params.mip)[0])
    first = candidates[0]
    voted = create_layer(dst_path, like=first, kind=LayerKind.FIELD, max_mip=max(first.mips))
    agreement = create_layer(agreement_path, like=first, kind=LayerKind.QUALITY, max_mip=max(first.mips),
                             extra={"meaning": "disagreement of the winning majority of vote candidates, px"})
    return candidates, voted, agreement, region
