"""copy: copy a region of a layer into a new layer of the same kind (e.g. to stage a subvolume)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import BBox
from ..pipeline import run_chunks
from ..progress import Progress, StepReport
from ..volumes import Layer, LayerKind, check_within, create_layer, open_layer
from .common import check_processing_chunk, processing_chunks


@dataclass(frozen=True)
class CopyParams:
    mip: int
    chunk_xy: int | None = None
    fill_missing: bool = False
    prefetch: int = 2


def copy_layer(src: Layer, dst: Layer, region: BBox, params: CopyParams, *,
               progress_interval: float | None = None) -> StepReport:
    chunks = processing_chunks(dst, region, params.chunk_xy)
    progress = Progress("copy", len(chunks), interval=progress_interval)

    def compute(chunk: BBox, data: np.ndarray) -> np.ndarray:
        return data

    run_chunks(chunks, src.read, compute, dst.write, progress, prefetch=params.prefetch)
    return progress.close()


def prepare_copy(src_path: str, dst_path: str, kind: LayerKind, region: BBox | None,
                 params: CopyParams) -> tuple[Layer, Layer, BBox]:
    src = open_layer(src_path, kind, fill_missing=params.fill_missing, role="--src")
    region = region or src.bounds(params.mip)
    check_within(src, region, "--src")
    check_processing_chunk(params.chunk_xy, src.chunk_size(params.mip)[0])
    dst = create_layer(dst_path, like=src, kind=kind, max_mip=max(src.mips), dtype=src.dtype,
                       chunk_xy=src.chunk_size(params.mip)[0])
    return src, dst, region
