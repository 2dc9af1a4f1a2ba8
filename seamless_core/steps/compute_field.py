"""compute_field: the field that aligns section z onto target section z−k, coarse to fine over stages.

Stage by stage (coarsest first), every chunk of the section is processed with `pad` pixels of context:
its initial field is the coarser stage's field (read back from the destination layer and upsampled with
unit scaling), its source window is exactly the region that field pulls from, the stage's estimator
chain refines the field, and the padded border is cropped before writing. Each stage's field is kept
in the destination layer at its own MIP, so a rerun or a finer stage starts from it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import fields
from ..devices import resolve_device
from ..errors import InputError
from ..estimators.base import Estimator, Pair
from ..estimators.batching import split_fields, stack_pairs
from ..estimators.spec import StageSpec, StagesSpec, build_estimator, parse_stages
from ..geometry import BBox, crop_xy
from ..pipeline import run_chunks
from ..progress import Progress, StepReport
from ..volumes import Layer, LayerKind, check_same_grid, check_within, create_layer, open_layer
from .common import check_processing_chunk, processing_chunks, read_field, read_mask, to_numpy, to_tensor
from .render import source_region

ON_EMPTY = ("error", "init")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputeFieldParams:
    stages: StagesSpec = field(default_factory=lambda: parse_stages(None))
    chunk_xy: int | None = None  # processing chunk at each stage's MIP
    pad: int = 64  # context pixels on each side, at each stage's MIP
    device: str = "cpu"
    fill_missing: bool = False
    on_empty_target: str = "error"  # "init": keep the coarser field (zeros) where the target is empty
    prefetch: int = 1
    batch: int = 1  # chunks per estimator call: fills a GPU (estimators.batching); 1 = chunk by chunk
    stage_range: tuple[int, int] | None = None  # run only stages [i, j): a task per MIP stage; i > 0 starts from stage i-1's field

    def selected(self) -> list[tuple[int, StageSpec]]:
        start, stop = self.stage_range or (0, len(self.stages.stages))
        return list(enumerate(self.stages.stages))[start:stop]


def normalise_image(data: np.ndarray, device: torch.device) -> torch.Tensor:
    """Images as float in [0, 1] (uint8 / 255; float32 images are taken as already in [0, 1])."""
    tensor = to_tensor(data, device)
    return tensor / 255.0 if data.dtype == np.uint8 else tensor


def compute_field(src: Layer, tgt: Layer, dst: Layer, region: BBox, tgt_z: int, params: ComputeFieldParams, *,
                  src_mask: Layer | None = None, tgt_mask: Layer | None = None,
                  progress_interval: float | None = None) -> StepReport:
    """Write the field aligning source section z = region.start[2] onto section `tgt_z` of `tgt`.

    `region` is given at MIP 0 (one section); `tgt` is normally the already aligned image, and
    tgt_z = z - k for the k-th vote target.
    """
    from ..estimators.multiscale import run_stage

    device = resolve_device(params.device)
    z = region.start[2]
    selected = params.selected()
    stage_plans = [
        (stage, processing_chunks(dst, region.to_mip(stage.mip, src.factors), params.chunk_xy))
        for _, stage in selected
    ]
    _check_target(tgt, region.to_mip(selected[0][1].mip, tgt.factors).with_z(tgt_z), params)
    progress = Progress(f"compute_field z={z}->{tgt_z}", sum(len(c) for _, c in stage_plans), interval=progress_interval)
    stage_reports = []
    first = selected[0][0]
    previous_mip: int | None = params.stages.stages[first - 1].mip if first > 0 else None
    rollbacks = [0]  # NaN/inf rollbacks of the estimators over the whole step
    for stage, chunks in stage_plans:
        estimators = [build_estimator(spec) for spec in stage.estimators]
        margin = max(int(getattr(e, "margin", 0)) for e in estimators)  # how far an estimator searches

        def load(chunk: BBox, prev: int | None = previous_mip, margin: int = margin,
                 stage: StageSpec = stage) -> tuple[Pair, torch.Tensor]:
            padded = chunk.padded(params.pad)
            if prev is None:
                init = fields.identity(padded.size[1], padded.size[0], device=device)
            else:
                init = read_field(dst, padded, prev, device)
            # where the field pulls from, and the target grid itself (estimators may search around it)
            origin = source_region(padded, init).union(padded).padded(margin)
            src_image = normalise_image(src.read(origin), device)
            tgt_image = normalise_image(tgt.read(padded.with_z(tgt_z)), device)
            pair = Pair(
                src=src_image,
                tgt=tgt_image,
                offset=(padded.start[0] - origin.start[0], padded.start[1] - origin.start[1]),
                src_defects=read_mask(src_mask, origin, _mask_mip(src_mask, stage.mip), device) if src_mask else None,
                tgt_defects=read_mask(tgt_mask, padded.with_z(tgt_z), _mask_mip(tgt_mask, stage.mip), device)
                if tgt_mask else None,
            )
            return pair, init

        def compute(group: list[BBox], loaded: list[tuple[Pair, torch.Tensor]],
                    estimators: list[Estimator] = estimators) -> list[np.ndarray]:
            results: list[torch.Tensor] = [init for _, init in loaded]  # no target here: keep the coarser field
            live = [i for i, (pair, _) in enumerate(loaded) if bool(pair.tgt_valid().any())]
            if len(live) == 1:
                pair, init = loaded[live[0]]
                results[live[0]] = run_stage(pair, estimators, init)
            elif live:
                pair, init, sizes = stack_pairs([loaded[i][0] for i in live], [loaded[i][1] for i in live])
                for i, result in zip(live, split_fields(run_stage(pair, estimators, init), sizes)):
                    results[i] = result
            if live:
                rollbacks[0] += _note_rollbacks(estimators, group, z, tgt_z, stage.mip)
            cropped = [crop_xy(result, params.pad) for result in results]
            for chunk, result in zip(group, cropped):
                _check_estimate(result, chunk, stage, z, tgt_z)
            return [to_numpy(result, "float32") for result in cropped]

        def store(group: list[BBox], results: list[np.ndarray]) -> None:
            for chunk, result in zip(group, results):
                dst.write(chunk, result)

        groups = [chunks[i : i + params.batch] for i in range(0, len(chunks), params.batch)]
        run_chunks(groups, lambda group, load=load: [load(chunk) for chunk in group], compute, store, progress,
                   prefetch=params.prefetch, pixels=lambda group: sum(c.size[0] * c.size[1] for c in group),
                   advance=len)
        stage_reports.append({"mip": stage.mip, "chunks": len(chunks),
                              "estimators": [e.name for e in stage.estimators]})
        previous_mip = stage.mip
    report = progress.close()
    report.details.update({"z": z, "tgt_z": tgt_z, "stages": stage_reports, "rollbacks": rollbacks[0]})
    return report


def _note_rollbacks(estimators: list[Estimator], group: list[BBox], z: int, tgt_z: int, mip: int) -> int:
    """The NaN/inf rollbacks the estimators just made, logged: a diverging optimisation shows in the log."""
    total = 0
    for estimator in estimators:
        count = int((getattr(estimator, "last_stats", None) or {}).get("rollbacks", 0) or 0)
        if count:
            total += count
            log.warning("compute_field z=%d->%d MIP %d: %s rolled back %d times (NaN or infinite loss) in %s; "
                        "the field kept is its last finite one", z, tgt_z, mip, getattr(estimator, "name", estimator),
                        count, ", ".join(str(chunk) for chunk in group))
    return total


def _check_estimate(field: torch.Tensor, chunk: BBox, stage: StageSpec, z: int, tgt_z: int) -> None:
    """Never write a NaN or infinite field: the step that made it fails, not the render that reads it."""
    low, high = torch.aminmax(field)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        raise InputError(
            f"the estimators of stage MIP {stage.mip} ({', '.join(e.name for e in stage.estimators)}) produced NaN "
            f"or infinite displacements for section {z} -> {tgt_z} in chunk {chunk}; that chunk was not written. "
            "Check the estimators' parameters (e.g. a smaller lr) and the two sections"
        )


def _mask_mip(mask: Layer, mip: int) -> int:
    """The MIP to read a mask at for a stage at `mip`: its own, else the mask's coarsest below it
    (read_mask max-pools it down), so a mask without the stage's MIP still masks every defect."""
    return min(mip, max(mask.mips))


def _check_target(tgt: Layer, coarse: BBox, params: ComputeFieldParams) -> None:
    """An entirely empty target gives no field: refuse it (or keep the coarser field when asked)."""
    if params.on_empty_target not in ON_EMPTY:
        raise InputError(f"on_empty_target must be one of {', '.join(ON_EMPTY)}, got {params.on_empty_target!r}")
    if params.on_empty_target == "error" and not np.any(tgt.read(coarse)):
        raise InputError(
            f"target section z={coarse.start[2]} of {tgt.path} is empty (all black at MIP {coarse.mip}); "
            "list it as a bad section so it is skipped as a target, or pass --on-empty-target init"
        )


def prepare_compute_field(src_path: str, tgt_path: str, dst_path: str, region: BBox | None, z: int, tgt_z: int,
                          params: ComputeFieldParams, *, src_mask_path: str | None = None,
                          tgt_mask_path: str | None = None) -> tuple[Layer, Layer, Layer, BBox, Layer | None, Layer | None]:
    """Validate everything (layers, stages, region, estimators) before creating the field layer."""
    resolve_device(params.device)
    count = len(params.stages.stages)
    if params.batch < 1:
        raise InputError(f"--batch must be at least 1 (chunks per estimator call), got {params.batch}")
    if params.stage_range is not None and not 0 <= params.stage_range[0] < params.stage_range[1] <= count:
        raise InputError(f"--stage-range {params.stage_range[0]}:{params.stage_range[1]} is not within the "
                         f"{count} stages (0:{count}); write it as I:J with 0 <= I < J <= {count}")
    src = open_layer(src_path, LayerKind.IMAGE, fill_missing=params.fill_missing, role="--src")
    tgt = open_layer(tgt_path, LayerKind.IMAGE, fill_missing=params.fill_missing, role="--tgt")
    check_same_grid(src, 0, tgt, 0, "--src and --tgt")
    finest, coarsest = params.stages.stages[-1].mip, params.stages.stages[0].mip
    for layer in (src, tgt):
        layer.scale(coarsest)  # refuses a missing MIP, naming the layer
    region = (region or src.bounds(0)).with_z(z)
    check_within(src, region, "--src")
    check_within(tgt, region.with_z(tgt_z), "--tgt")
    if tgt_z == z and tgt.path == src.path:
        raise InputError(f"section {z} cannot be aligned to itself: choose a target z other than {z}")
    for stage in params.stages.stages:
        for spec in stage.estimators:
            build_estimator(spec)  # unknown estimators, bad params, missing archives fail here
    masks = []
    for path, role in ((src_mask_path, "--src-mask"), (tgt_mask_path, "--tgt-mask")):
        masks.append(open_layer(path, LayerKind.MASK, fill_missing=True, role=role) if path else None)
        if masks[-1] is not None:
            check_same_grid(src, 0, masks[-1], 0, f"--src and {role}")
    check_processing_chunk(params.chunk_xy, src.chunk_size(finest)[0])
    dst = create_layer(dst_path, like=src, kind=LayerKind.FIELD, max_mip=max(coarsest, max(src.mips)),
                       extra={"stages": params.stages.model_dump()})
    return src, tgt, dst, region, masks[0], masks[1]
