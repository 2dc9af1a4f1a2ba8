"""copy: copy a region of a layer into a new layer of the same kind (e.g. to stage a subvolume)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..geometry import BBox, RegionRequest, requested_region
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
    refuse_empty: bool = False  # a block start: a section with no tissue at all cannot anchor a block


def copy_layer(src: Layer, dst: Layer, region: BBox, params: CopyParams, *,
               progress_interval: float | None = None) -> StepReport:
    chunks = processing_chunks(dst, region, params.chunk_xy)
    progress = Progress("copy", len(chunks), interval=progress_interval)

    def compute(chunk: BBox, data: np.ndarray) -> np.ndarray:
        return data

    run_chunks(chunks, src.read, compute, dst.write, progress, prefetch=params.prefetch)
    return progress.close()


def empty_sections(src: Layer, region: BBox) -> list[int]:
    """The sections of `region` with no tissue at all: every pixel 0 (read at the coarsest MIP: cheap)."""
    coarsest = src.mips[-1]
    box = region.to_mip(coarsest, src.factors).intersection(src.bounds(coarsest))
    data = src.read(box)
    return [box.start[2] + i for i in range(data.shape[0]) if not data[i].any()]


def refuse_empty_sections(src: Layer, region: BBox, why: str, empty: list[int] | None = None) -> None:
    """Refuse, naming them, the sections of `region` (or the `empty` ones given) that are entirely black.

    A block aligns onto its first section; an all-black one gives the block an empty frame, its next
    section is taken as it is and the whole block lands off by that section's misalignment.
    """
    empty = empty_sections(src, region) if empty is None else empty
    coarsest = src.mips[-1]
    if empty:
        listed = ", ".join(str(z) for z in empty)
        raise InputError(f"section{'s' if len(empty) > 1 else ''} z={listed} of {src.path} {'are' if len(empty) > 1 else 'is'} "
                         f"entirely black (no tissue at MIP {coarsest}) and cannot {why}: list {'them' if len(empty) > 1 else 'it'} "
                         f"in the project's bad_sections (bad_sections: [{listed}]) and plan again; a listed section "
                         "is never a target or a block start")


def prepare_copy(src_path: str, dst_path: str, kind: LayerKind, region: RegionRequest,
                 params: CopyParams) -> tuple[Layer, Layer, BBox]:
    src = open_layer(src_path, kind, fill_missing=params.fill_missing, role="--src")
    region = requested_region(region, src.bounds(params.mip))
    check_within(src, region, "--src")
    check_processing_chunk(params.chunk_xy, src.chunk_size(params.mip)[0])
    if params.refuse_empty:  # before the destination exists: nothing half-written
        refuse_empty_sections(src, region, "start a block")
    dst = create_layer(dst_path, like=src, kind=kind, max_mip=max(src.mips), dtype=src.dtype,
                       chunk_xy=src.chunk_size(params.mip)[0])
    return src, dst, region
