"""The local demo: misalign the real sample with known fields, then align it with the whole workflow.

It ingests the shared sections, renders each through a known misalignment (section 0 untouched), scores
both with CPC, writes a project config for the misaligned stack and runs `seamless align` on it (blocks,
vote, stitching, compose, final render, CPC, report). Each stage prints the equivalent CLI command.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .ingest import ingest
from .neuroglancer import viewer_link
from .steps.common import to_numpy
from .steps.cpc import CpcParams, cpc, prepare_cpc
from .steps.downsample import DownsampleParams, downsample, prepare_downsample
from .steps.render import RenderParams, prepare_render, render
from .synthetic import section_misalignment
from .volumes import LayerKind, create_layer, normalise_path

log = logging.getLogger("seamless.demo")


@dataclass
class DemoResult:
    original: str
    misaligned: str
    field: str
    cpc_original: list[dict[str, Any]]
    cpc_misaligned: list[dict[str, Any]]
    link: str
    project: Path | None = None
    aligned: str | None = None
    cpc_aligned: list[dict[str, Any]] | None = None
    steps_run: int = 0
    steps_skipped: int = 0
    seconds: float = 0.0


DEMO_PROJECT = """\
# written by `seamless demo`: align the misaligned sample (real ssTEM neighbours, 50 nm apart)
source: {source}
destination: {destination}
sections: {{start: 0, stop: {stop}}}
stages: serial          # block matching at MIP 2, stiff: aligns neighbours without morphing them
vote: {{k: 3}}
blocks: {{size: 10, decay_dist: 100}}
cpc: {{mip: 1, patch: 32}}
device: {device}
"""


def run_demo(data: Path, out: Path, *, sections: int | None = None, device: str = "cpu", seed: int = 0,
             align: bool = True, workers: int = 2) -> DemoResult:
    out = out.resolve()
    original_path = normalise_path(str(out / "original"))
    log.info("ingest: seamless ingest --images %s --dst %s --resolution 4,4,50", data, original_path)
    original = ingest(data, original_path, resolution=(4, 4, 50), max_mip=3, chunk_xy=256, limit=sections)
    _downsample(original_path, LayerKind.IMAGE, device)

    field_path = normalise_path(str(out / "known_field"))
    field = create_layer(field_path, like=original, kind=LayerKind.FIELD, max_mip=3, chunk_xy=256)
    bounds = original.bounds(0)
    width, height, depth = bounds.size
    for z in range(depth):  # section 0 stays put: it anchors the stack
        known = section_misalignment(height, width, seed=seed + 7919 * z) if z else np.zeros((1, 2, height, width))
        field.write(bounds.with_z(z), to_numpy(_as_tensor(known), "float32"))

    misaligned_path = normalise_path(str(out / "misaligned"))
    log.info("render: seamless render --src %s --field %s --dst %s --mip 0", original_path, field_path, misaligned_path)
    params = RenderParams(mip=0, device=device)
    src, fld, dst, _, region = prepare_render(original_path, field_path, misaligned_path, None, params, chunk_storage=256)
    render(src, fld, dst, region, params)
    _downsample(misaligned_path, LayerKind.IMAGE, device)

    summaries = []
    for name in ("original", "misaligned"):
        cpc_path = normalise_path(str(out / f"cpc_{name}"))
        log.info("cpc: seamless cpc --src %s --dst %s --mip 1 --patch 32", normalise_path(str(out / name)), cpc_path)
        cparams = CpcParams(mip=1, patch=32, device=device)
        s, d, r = prepare_cpc(normalise_path(str(out / name)), cpc_path, None, cparams)
        summaries.append(cpc(s, d, r, cparams).details["sections"])
    layers = [("original", original_path), ("misaligned", misaligned_path)]
    result = DemoResult(original_path, misaligned_path, field_path, summaries[0], summaries[1], "")
    if align:
        _align(result, out, depth, device, workers)
        layers.append(("aligned", result.aligned or ""))
    result.link = viewer_link(layers, serve_root=str(out), position=(width / 2, height / 2, 1))
    return result


def _align(result: DemoResult, out: Path, depth: int, device: str, workers: int) -> None:
    """Write the demo's project config and run the whole workflow on the misaligned stack."""
    from .cli_workflow import load_project
    from .executor import StepFailed, execute
    from .plan import build_plan
    from .report import build_report, default_out_dir

    project = out / "project.yaml"
    project.write_text(DEMO_PROJECT.format(source=result.misaligned, destination=normalise_path(str(out / "aligned")),
                                           stop=depth, device=device))
    log.info("align: seamless align %s --workers %d", project, workers)
    plan = build_plan(load_project(project, None))
    summary = execute(plan, workers=workers)
    if summary.failed:
        raise StepFailed(f"demo step {summary.failed[0]} failed; see its log under {out / 'aligned' / '.seamless' / 'logs'}",
                         summary.exit_code)
    build_report(plan.config.source, plan.layout.destination, default_out_dir(plan.layout.destination), z_range=(0, depth))
    result.project, result.aligned = project, plan.layout.image
    result.steps_run, result.steps_skipped, result.seconds = len(summary.ran), len(summary.skipped), summary.seconds
    result.cpc_aligned = [json.loads((out / "aligned" / "cpc" / "summary" / f"{z}.json").read_text())
                          for z in range(1, depth)]


def _downsample(path: str, kind: LayerKind, device: str) -> None:
    log.info("downsample: seamless downsample --src %s --mip 0 --dst-mip 3", path)
    params = DownsampleParams(src_mip=0, dst_mip=3, device=device)
    layer, region = prepare_downsample(path, kind, None, params)
    downsample(layer, region, params)


def _as_tensor(array):
    import torch

    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array, dtype=np.float32))
