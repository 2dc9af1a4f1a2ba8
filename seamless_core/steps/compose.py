"""compose: one field from several, outermost first, each scaled by a weight (compose with decay).

The workflow's final field of section z is its block field composed under the stitch fields of the
blocks before it, each faded by its distance from the stitch:

    F = compose(w_1 S_1, compose(w_2 S_2, ... compose(w_n S_n, f_z)))
    compose(a, b)(p) = a(p) + b(p + a(p))             (pull convention: warp by F = warp by f_z, then S_n, ...)

Per chunk the displacement d starts at 0 and, term by term, d += w_i * T_i(p + d): each term is read
over exactly the window the current displacement reaches into (read with edge replication, sampled
bilinearly), so displacements larger than a chunk compose correctly; beyond `max_reach` the step
refuses instead of clipping. The report counts the composed field's folded pixels (steps/folds.py) and
gives its rigid part, how far it turns and shifts the section (steps/drift.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import fields
from ..devices import resolve_device
from ..errors import DisplacementTooLarge, InputError
from ..geometry import BBox, reach_beyond
from ..pipeline import run_chunks
from ..progress import Progress, StepReport
from ..volumes import Layer, LayerKind, check_same_grid, check_within, create_layer, open_layer
from .common import check_processing_chunk, processing_chunks, read_field, to_numpy
from .drift import DriftTally
from .folds import FoldTally
from .render import source_region


@dataclass(frozen=True)
class ComposeTerm:
    layer: Layer
    z: int  # the section of `layer` this term reads (a stitch field lives at its block's start)
    weight: float


@dataclass(frozen=True)
class ComposeParams:
    mip: int
    chunk_xy: int | None = None
    max_reach: int = 4096
    device: str = "cpu"
    prefetch: int = 1


def compose_fields(terms: list[ComposeTerm], dst: Layer, region: BBox, params: ComposeParams, *,
                   progress_interval: float | None = None) -> StepReport:
    """Write the composition of `terms` (outermost first) over `region` (one section of `dst`)."""
    device = resolve_device(params.device)
    chunks = processing_chunks(dst, region, params.chunk_xy)
    folds = FoldTally("compose: the composed field of")
    drift = DriftTally(centre=(region.start[0] + (region.size[0] - 1) / 2, region.start[1] + (region.size[1] - 1) / 2),
                       scale=dst.resolution(params.mip)[0] / dst.resolution(0)[0])

    def compute(chunk: BBox, _: None) -> np.ndarray:
        height, width = chunk.size[1], chunk.size[0]
        displacement = fields.identity(height, width, device=device)
        for term in terms:
            displacement = displacement + term.weight * _sample_term(term, chunk, displacement, params)
        folds.add(displacement)
        drift.add(displacement, (chunk.start[0], chunk.start[1]))
        return to_numpy(displacement, "float32")

    progress = Progress(f"compose z={region.start[2]}", len(chunks), interval=progress_interval)
    run_chunks(chunks, lambda chunk: None, compute, dst.write, progress, prefetch=params.prefetch)
    report = progress.close()
    report.details.update({"mip": params.mip, "terms": [{"layer": t.layer.path, "z": t.z, "weight": t.weight} for t in terms],
                           **folds.details(), **drift.details()})
    folds.warn_if_folded(region.start[2])
    return report


def _sample_term(term: ComposeTerm, chunk: BBox, displacement: torch.Tensor, params: ComposeParams) -> torch.Tensor:
    """term(p + d(p)) over the chunk, reading only the window that p + d reaches."""
    window = source_region(chunk, displacement)
    reach = reach_beyond(chunk, window)
    if reach > params.max_reach:
        raise DisplacementTooLarge(
            f"composing {term.layer.path}: displacements reach {reach} px beyond chunk {chunk}, more than "
            f"--max-reach {params.max_reach}; check the fields composed before it"
        )
    values = read_field(term.layer, window.with_z(term.z), params.mip, displacement.device)
    offset = torch.tensor([chunk.start[0] - window.start[0], chunk.start[1] - window.start[1]],
                          dtype=displacement.dtype, device=displacement.device).view(1, 2, 1, 1)
    coords = fields.pixel_grid(chunk.size[1], chunk.size[0], device=displacement.device) + displacement + offset
    return fields.sample(values, coords, padding="border")


def parse_terms(paths: list[str], at: list[int], weights: list[float]) -> list[tuple[str, int, float]]:
    if not (len(paths) == len(at) == len(weights)):
        raise InputError(f"give one --at and one --weight per --field (got {len(paths)} fields, {len(at)} --at, "
                         f"{len(weights)} --weight)")
    return list(zip(paths, at, weights))


def prepare_compose(terms: list[tuple[str, int, float]], dst_path: str, z: int, region: BBox | None,
                    params: ComposeParams, *, like: str | None = None) -> tuple[list[ComposeTerm], Layer, BBox]:
    """Open and check every term before creating the destination; no term (with --like) writes zeros."""
    resolve_device(params.device)
    layers = [open_layer(path, LayerKind.FIELD, role=f"--field #{i + 1}") for i, (path, _, _) in enumerate(terms)]
    if not layers and not like:
        raise InputError("compose needs at least one --field, or --like LAYER to write the identity field")
    for i, (layer, (_, term_z, weight)) in enumerate(zip(layers, terms)):
        layer.scale(params.mip)
        if weight < 0 or weight > 1:
            raise InputError(f"--weight #{i + 1} is {weight}: decay weights lie in [0, 1]")
        if i:
            check_same_grid(layers[0], params.mip, layer, params.mip, "composed fields")
    reference = layers[0] if layers else open_layer(like, LayerKind.IMAGE, role="--like")  # type: ignore[arg-type]
    region = (region or reference.bounds(params.mip)).with_z(z)
    for layer, (_, term_z, _) in zip(layers, terms):
        check_within(layer, region.with_z(term_z), layer.path)
    check_processing_chunk(params.chunk_xy, reference.chunk_size(params.mip)[0])
    dst = create_layer(dst_path, like=reference, kind=LayerKind.FIELD, max_mip=max(reference.mips))
    return [ComposeTerm(layer, term_z, weight) for layer, (_, term_z, weight) in zip(layers, terms)], dst, region
