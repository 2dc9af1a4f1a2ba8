"""`seamless`: every step runnable by hand, and the entry point inside pods and local Airflow tasks.

Each subcommand validates its inputs before writing anything, logs progress lines (or shows a bar on
a terminal), can write a JSON report (--report-json) for the orchestrator, and exits with a code
that says what went wrong (seamless_core.errors.ExitCode).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import ExitCode, InputError, Interrupted, SeamlessError
from .geometry import BBox, RegionRequest

app = typer.Typer(
    name="seamless",
    help="SEAMLeSS alignment steps over CloudVolume layers (file://, gs://, s3://).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
log = logging.getLogger("seamless")

# Options shared by the steps --------------------------------------------------------------------------
Src = Annotated[str, typer.Option("--src", help="Source layer (file://, gs://, s3:// or a local path).")]
Dst = Annotated[str, typer.Option("--dst", help="Destination layer; created from the source if missing.")]
Mip = Annotated[int, typer.Option("--mip", min=0, help="MIP level to work at.")]
BBoxOpt = Annotated[
    Optional[str], typer.Option("--bbox", help="Region x0,y0,z0:x1,y1,z1 in voxels at --bbox-mip (default: whole volume).")
]
BBoxMip = Annotated[int, typer.Option("--bbox-mip", min=0, help="MIP level the --bbox is given at.")]
ZOpt = Annotated[Optional[str], typer.Option("--z", help="Section range A:B (B excluded); overrides the z of --bbox.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
Chunk = Annotated[Optional[int], typer.Option("--chunk", min=1, help="Processing chunk edge in pixels (multiple of the storage chunk).")]
FillMissing = Annotated[bool, typer.Option("--fill-missing", help="Treat missing source chunks as black instead of failing.")]
DownsampleTo = Annotated[Optional[int], typer.Option("--downsample-to", min=1, help="Then build MIPs --mip+1 .. this of the written region (one task instead of two).")]
Report = Annotated[Optional[Path], typer.Option("--report-json", help="Write the step's figures as JSON here.")]


def parse_z(text: str, option: str = "--z") -> tuple[int, int]:
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise InputError(f"cannot read {option} {text!r}: write it as A:B, e.g. {option} 10:20") from None
    if stop <= start:
        raise InputError(f"{option} {text!r} is empty or reversed: B must be greater than A")
    return start, stop


def region_request(bbox: str | None, bbox_mip: int, z: str | None, mip: int) -> RegionRequest:
    """--bbox/--bbox-mip/--z as a request the step resolves against the source it opens (None: all).

    Parsed here, once, so a malformed option fails before any layer is read."""
    if not (bbox or z):
        return None
    box = BBox.parse(bbox, bbox_mip).to_mip(mip) if bbox else None
    sections = parse_z(z) if z else None

    def within(bounds: BBox) -> BBox:
        region = bounds if box is None else box
        return region.with_z(*sections) if sections else region

    return within


_LAST_REPORT: dict[str, Any] = {}  # the last step's figures, kept in its restart marker


def _finish(report: Any, report_json: Path | None) -> None:
    data = report.as_dict()
    _LAST_REPORT.clear()
    _LAST_REPORT.update(data)
    if report_json:
        report_json.parent.mkdir(parents=True, exist_ok=True)
        report_json.write_text(json.dumps(data, indent=2))
    typer.echo(json.dumps(data))


# Steps -------------------------------------------------------------------------------------------------
@app.command()
def render(
    src: Src,
    field: Annotated[str, typer.Option("--field", help="Field layer (pull convention, pixels of its MIP).")],
    dst: Dst,
    mip: Mip = 0,
    field_mip: Annotated[Optional[int], typer.Option("--field-mip", min=0, help="MIP of the field (default --mip); coarser fields are upsampled.")] = None,
    mask: Annotated[Optional[str], typer.Option("--mask", help="Defect mask layer: masked pixels render black.")] = None,
    mask_mip: Annotated[Optional[int], typer.Option("--mask-mip", min=0, help="MIP of the mask (default --mip).")] = None,
    bbox: BBoxOpt = None,
    bbox_mip: BBoxMip = 0,
    z: ZOpt = None,
    chunk: Chunk = None,
    max_reach: Annotated[int, typer.Option("--max-reach", min=1, help="Most pixels a field may pull from beyond a chunk.")] = 4096,
    fill_holes_from: Annotated[Optional[int], typer.Option(
        "--fill-holes-from", min=0,
        help="Section of --dst, already rendered, whose pixels replace this render's black ones (block targets).")] = None,
    downsample_to: DownsampleTo = None,
    device: Device = "cpu",
    fill_missing: FillMissing = False,
    report_json: Report = None,
) -> None:
    """Warp an image layer through a field layer."""
    from .steps.render import RenderParams, prepare_render
    from .steps.render import render as run
    from .volumes import LayerKind

    params = RenderParams(mip=mip, field_mip=field_mip, mask_mip=mask_mip, chunk_xy=chunk, max_reach=max_reach,
                          device=device, fill_missing=fill_missing, fill_holes_from=fill_holes_from)
    region = region_request(bbox, bbox_mip, z, mip)
    layers = prepare_render(src, field, dst, region, params, mask_path=mask)
    s, f, d, m, r = layers
    report = run(s, f, d, r, params, mask=m)
    _finish(_then_downsample(report, dst, r, mip, downsample_to, device), report_json)


def _then_downsample(report: Any, path: str, region: Any, mip: int, top: int | None, device: str) -> Any:
    """--downsample-to: build the coarser MIPs of what the step just wrote, in the same task.

    One task instead of two per section: Airflow's per-task cost dominates such short steps (docs/dags.md).
    """
    if top is None or top <= mip:
        return report
    from .steps.downsample import DownsampleParams, prepare_downsample
    from .steps.downsample import downsample as run
    from .volumes import LayerKind

    params = DownsampleParams(src_mip=mip, dst_mip=top, device=device)
    layer, area = prepare_downsample(path, LayerKind.IMAGE, region, params)
    report.details["downsample"] = run(layer, area, params).as_dict()
    return report


@app.command()
def downsample(
    src: Src,
    mip: Mip = 0,
    dst_mip: Annotated[int, typer.Option("--dst-mip", min=1, help="Coarsest MIP to build.")] = 3,
    kind: Annotated[str, typer.Option("--kind", help="image, mask or field: decides the reduction.")] = "image",
    mask_rule: Annotated[str, typer.Option("--mask-rule", help="max or mode, for masks.")] = "max",
    bbox: BBoxOpt = None,
    bbox_mip: BBoxMip = 0,
    z: ZOpt = None,
    chunk: Chunk = None,
    device: Device = "cpu",
    report_json: Report = None,
) -> None:
    """Build MIP levels --mip+1 .. --dst-mip of a layer in place."""
    from .steps.downsample import DownsampleParams, prepare_downsample
    from .steps.downsample import downsample as run

    layer_kind = _kind(kind, ("image", "mask", "field"))
    params = DownsampleParams(src_mip=mip, dst_mip=dst_mip, mask_rule=mask_rule, chunk_xy=chunk, device=device)
    region = region_request(bbox, bbox_mip, z, mip)
    layer, region = prepare_downsample(src, layer_kind, region, params)
    _finish(run(layer, region, params), report_json)


@app.command()
def cpc(
    src: Src,
    dst: Dst,
    mip: Mip = 2,
    patch: Annotated[int, typer.Option("--patch", help="Window edge in pixels at --mip; one output voxel each.")] = 64,
    offset: Annotated[int, typer.Option("--offset", help="Compare section z with z - offset.")] = 1,
    bbox: BBoxOpt = None,
    bbox_mip: BBoxMip = 0,
    z: ZOpt = None,
    device: Device = "cpu",
    fill_missing: FillMissing = False,
    report_json: Report = None,
) -> None:
    """Chunked Pearson correlation of each section with the previous one (quality map + summaries)."""
    from .steps.cpc import CpcParams, prepare_cpc
    from .steps.cpc import cpc as run
    from .volumes import LayerKind

    params = CpcParams(mip=mip, patch=patch, offset=offset, device=device, fill_missing=fill_missing)
    region = region_request(bbox, bbox_mip, z, mip)
    s, d, r = prepare_cpc(src, dst, region, params)
    _finish(run(s, d, r, params), report_json)


@app.command()
def copy(
    src: Src,
    dst: Dst,
    mip: Mip = 0,
    kind: Annotated[str, typer.Option("--kind", help="image, mask or field.")] = "image",
    bbox: BBoxOpt = None,
    bbox_mip: BBoxMip = 0,
    z: ZOpt = None,
    chunk: Chunk = None,
    downsample_to: DownsampleTo = None,
    fill_missing: FillMissing = False,
    refuse_empty: Annotated[bool, typer.Option("--refuse-empty", help="Refuse (exit 3) a section with no tissue at all "
                                               "(a block start: it would leave the block without a frame).")] = False,
    report_json: Report = None,
) -> None:
    """Copy a region of a layer into another layer of the same kind."""
    from .steps.copy import CopyParams, copy_layer, prepare_copy

    layer_kind = _kind(kind, ("image", "mask", "field"))
    params = CopyParams(mip=mip, chunk_xy=chunk, fill_missing=fill_missing, refuse_empty=refuse_empty)
    region = region_request(bbox, bbox_mip, z, mip)
    s, d, r = prepare_copy(src, dst, layer_kind, region, params)
    report = copy_layer(s, d, r, params)
    if downsample_to is not None and layer_kind.value != "image":
        raise InputError("--downsample-to applies to image layers; use `seamless downsample --kind` for others")
    _finish(_then_downsample(report, dst, r, mip, downsample_to, "cpu"), report_json)


@app.command("convert-field")
def convert_field(
    src: Src,
    dst: Dst,
    source: Annotated[str, typer.Option("--from", help="corgie (channel 0 is y) or seamless-legacy (MIP-0 pixels).")],
    mip: Mip = 0,
    bbox: BBoxOpt = None,
    bbox_mip: BBoxMip = 0,
    z: ZOpt = None,
    chunk: Chunk = None,
    fill_missing: FillMissing = False,
    report_json: Report = None,
) -> None:
    """Convert a corgie or old-SEAMLeSS field layer into this project's field convention."""
    from .steps.convert_field import ConvertParams, prepare_convert
    from .steps.convert_field import convert_field as run

    params = ConvertParams(source=source, mip=mip, chunk_xy=chunk, fill_missing=fill_missing)
    region = region_request(bbox, bbox_mip, z, mip)
    s, d, r = prepare_convert(src, dst, region, params)
    _finish(run(s, d, r, params), report_json)


def load_stages(text: str | None) -> Any:
    """--stages: a preset name (exact, serial), a YAML/JSON file, or inline JSON; None gives the defaults."""
    from .estimators.spec import PRESETS, parse_stages, preset

    if text is None:
        return parse_stages(None)
    if text in PRESETS:
        return preset(text)
    import yaml

    path = Path(text)
    try:
        data = yaml.safe_load(path.read_text()) if path.exists() else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read --stages {text!r}: give a YAML/JSON file or inline JSON ({exc})") from None
    return parse_stages(data)


@app.command("compute-field")
def compute_field(
    src: Src,
    tgt: Annotated[str, typer.Option("--tgt", help="Target image layer (normally the aligned image).")],
    dst: Annotated[str, typer.Option("--dst", help="Field layer to write (one per target offset).")],
    z: Annotated[int, typer.Option("--z", help="Source section.")],
    offset: Annotated[int, typer.Option("--offset", min=1, help="Target section is z - offset.")] = 1,
    tgt_z: Annotated[Optional[int], typer.Option("--tgt-z", help="Explicit target section (overrides --offset).")] = None,
    stages: Annotated[Optional[str], typer.Option("--stages", help="Stage spec: a preset (exact: the default, block matching at MIP 2 then finetuner at MIP 1 and 0; serial: block matching at MIP 2 for real neighbours), a YAML/JSON file, or inline JSON.")] = None,
    src_mask: Annotated[Optional[str], typer.Option("--src-mask", help="Defect mask of the source sections.")] = None,
    tgt_mask: Annotated[Optional[str], typer.Option("--tgt-mask", help="Defect mask of the target sections.")] = None,
    bbox: BBoxOpt = None,
    bbox_mip: BBoxMip = 0,
    chunk: Chunk = None,
    pad: Annotated[int, typer.Option("--pad", min=0, help="Context pixels per side at each stage's MIP.")] = 64,
    on_empty_target: Annotated[str, typer.Option("--on-empty-target", help="error, or init (keep the coarser field).")] = "error",
    stage_range: Annotated[Optional[str], typer.Option("--stage-range", help="Run only stages I:J (0-based, J excluded); stage I starts from stage I-1's field in --dst.")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Chunks per estimator call (stacked on the device; 4-16 fill a GPU).")] = 1,
    device: Device = "cpu",
    fill_missing: FillMissing = False,
    report_json: Report = None,
) -> None:
    """Field aligning section z onto section z - offset, coarse to fine over the stages."""
    from .steps.compute_field import ComputeFieldParams, prepare_compute_field
    from .steps.compute_field import compute_field as run

    params = ComputeFieldParams(stages=load_stages(stages), chunk_xy=chunk, pad=pad, device=device,
                                fill_missing=fill_missing, on_empty_target=on_empty_target, batch=batch,
                                stage_range=parse_z(stage_range, "--stage-range") if stage_range else None)
    region = BBox.parse(bbox, bbox_mip).to_mip(0) if bbox else None
    target_z = z - offset if tgt_z is None else tgt_z
    s, t, d, r, sm, tm = prepare_compute_field(src, tgt, dst, region, z, target_z, params,
                                               src_mask_path=src_mask, tgt_mask_path=tgt_mask)
    _finish(run(s, t, d, r, target_z, params, src_mask=sm, tgt_mask=tm), report_json)


@app.command()
def vote(
    fields: Annotated[list[str], typer.Option("--field", help="Candidate field layer; repeat, an odd number of times.")],
    dst: Annotated[str, typer.Option("--dst", help="Voted field layer.")],
    agreement: Annotated[str, typer.Option("--agreement", help="Quality layer: disagreement of the winning majority, px.")],
    z: Annotated[int, typer.Option("--z", help="Section to vote.")],
    mip: Mip = 0,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmin temperature, px.")] = 1.0,
    blur: Annotated[float, typer.Option("--blur", help="Gaussian sigma over which agreement is judged, px.")] = 2.0,
    bbox: BBoxOpt = None,
    bbox_mip: BBoxMip = 0,
    chunk: Chunk = None,
    device: Device = "cpu",
    report_json: Report = None,
) -> None:
    """Vector-vote a section's candidate fields (SEAMLeSS softmin over majority subsets)."""
    from .steps.vector_vote import VoteParams, prepare_vote, vote_fields

    params = VoteParams(mip=mip, temperature=temperature, blur_sigma=blur, chunk_xy=chunk, device=device)
    region = BBox.parse(bbox, bbox_mip).to_mip(mip) if bbox else None
    c, v, a, r = prepare_vote(fields, dst, agreement, region, z, params)
    _finish(vote_fields(c, v, a, r, params), report_json)


@app.command()
def compose(
    dst: Annotated[str, typer.Option("--dst", help="Field layer to write.")],
    z: Annotated[int, typer.Option("--z", help="Section to write.")],
    fields: Annotated[Optional[list[str]], typer.Option("--field", help="Field layer; repeat, outermost first (applied last).")] = None,
    at: Annotated[Optional[list[int]], typer.Option("--at", help="Section of each --field to read (a stitch field lives at its block start).")] = None,
    weights: Annotated[Optional[list[float]], typer.Option("--weight", help="Scale of each --field in [0, 1] (decay).")] = None,
    like: Annotated[Optional[str], typer.Option("--like", help="With no --field: image layer whose geometry the identity field takes.")] = None,
    mip: Mip = 0,
    bbox: BBoxOpt = None,
    bbox_mip: BBoxMip = 0,
    chunk: Chunk = None,
    max_reach: Annotated[int, typer.Option("--max-reach", min=1, help="Most pixels a composed displacement may reach beyond a chunk.")] = 4096,
    device: Device = "cpu",
    report_json: Report = None,
) -> None:
    """Compose weighted fields, outermost first: compose with decay of the block stitch fields."""
    from .steps.compose import ComposeParams, compose_fields, parse_terms, prepare_compose

    params = ComposeParams(mip=mip, chunk_xy=chunk, max_reach=max_reach, device=device)
    terms = parse_terms(fields or [], at or [], weights or [])
    region = BBox.parse(bbox, bbox_mip).to_mip(mip) if bbox else None
    t, d, r = prepare_compose(terms, dst, z, region, params, like=like)
    _finish(compose_fields(t, d, r, params), report_json)


@app.command()
def train(
    src: Src,
    dst: Annotated[str, typer.Option("--dst", help="Model archive folder to write (local, file://, gs://); checkpoints go to <dst>.ckpt/.")],
    z: Annotated[str, typer.Option("--z", help="Training sections A:B (B excluded).")],
    mip: Annotated[int, typer.Option("--mip", min=0, help="MIP level to train at (recorded in the archive).")] = 2,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimiser steps.")] = 1700,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Pairs per step.")] = 8,
    patch: Annotated[int, typer.Option("--patch", min=8, help="Square crop edge in px at --mip.")] = 96,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Adam learning rate.")] = 1e-3,
    smoothness: Annotated[float, typer.Option("--smoothness", min=0.0, help="Weight of the field smoothness loss.")] = 1.0,
    epe_weight: Annotated[float, typer.Option("--epe-weight", min=0.0, help="Supervised EPE weight on synthetic pairs (0 = self-supervised only).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (training is deterministic for a seed).")] = 0,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the newest checkpoint in <dst>.ckpt/.")] = False,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.")] = 200,
    threads: Annotated[int, typer.Option("--threads", min=1, help="CPU threads for training.")] = 1,
    device: Device = "cpu",
    report_json: Report = None,
) -> None:
    """Train the SEAMLeSS pyramid self-supervised on sections of an image layer; writes a model archive."""
    from .train import train as run

    result = run(src, dst, z_range=parse_z(z), mip=mip, steps=steps, batch=batch, patch=patch, lr=lr,
                 smoothness=smoothness, seed=seed, resume=resume, checkpoint_every=checkpoint_every,
                 device=device, epe_weight=epe_weight, threads=threads)
    training = result["training"]
    data = {"archive": dst, "steps": training["steps"], "seconds": training["seconds"],
            "final_losses": training["final_losses"]}
    if report_json:
        report_json.parent.mkdir(parents=True, exist_ok=True)
        report_json.write_text(json.dumps(data, indent=2))
    typer.echo(json.dumps(data))


# Data and viewing ------------------------------------------------------------------------------------
@app.command()
def ingest(
    images: Annotated[Path, typer.Option("--images", help="Folder of section images named <z>.png.")],
    dst: Dst,
    resolution: Annotated[str, typer.Option("--resolution", help="Voxel size in nm, x,y,z.")] = "4,4,50",
    max_mip: Annotated[int, typer.Option("--max-mip", min=0, help="MIP levels to declare (fill with downsample).")] = 3,
    chunk: Annotated[int, typer.Option("--chunk", min=16, help="Storage chunk edge (x and y).")] = 256,
) -> None:
    """Write a folder of 8-bit section images as a precomputed image layer."""
    from .ingest import ingest as run

    try:
        res = tuple(float(v) for v in resolution.split(","))
    except ValueError:
        raise InputError(f"cannot read --resolution {resolution!r}: write it as x,y,z in nm, e.g. 4,4,50") from None
    if len(res) != 3 or min(res) <= 0:
        raise InputError(f"--resolution {resolution!r} needs three positive numbers x,y,z")
    layer = run(images, dst, resolution=res, max_mip=max_mip, chunk_xy=chunk)  # type: ignore[arg-type]
    typer.echo(json.dumps({"layer": layer.path, "bounds": str(layer.bounds(0))}))


@app.command()
def demo(
    data: Annotated[Path, typer.Option("--data", help="Folder of the shared sample sections.")] = Path("../shared/data/isbi2012"),
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's layers.")] = Path("work/demo"),
    sections: Annotated[Optional[int], typer.Option("--sections", min=2, help="Use only the first N sections.")] = None,
    device: Device = "cpu",
    align: Annotated[bool, typer.Option("--align/--no-align", help="Run the alignment workflow on the misaligned stack.")] = True,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Workflow steps run at once.")] = 2,
) -> None:
    """Misalign the sample with known fields, then align it with the whole workflow and score it with CPC."""
    from .demo import run_demo

    result = run_demo(data, out, sections=sections, device=device, align=align, workers=workers)

    def mean_median(summaries: list[dict[str, Any]] | None) -> str:
        values = [s["median"] for s in summaries or [] if s["median"] is not None]
        return f"{sum(values) / len(values):.3f}" if values else "n/a"

    typer.echo(f"original layer:   {result.original}")
    typer.echo(f"misaligned layer: {result.misaligned}  (rendered through {result.field})")
    if result.aligned:
        typer.echo(f"aligned layer:    {result.aligned}  (project {result.project}: {result.steps_run} steps run, "
                   f"{result.steps_skipped} already done, {result.seconds:.0f} s)")
        typer.echo(f"report:           {Path(out) / 'aligned' / 'report' / 'index.html'}")
    typer.echo(f"mean of per-section median CPC of neighbours (MIP 1, 32 px windows): original "
               f"{mean_median(result.cpc_original)}, misaligned {mean_median(result.cpc_misaligned)}, "
               f"aligned {mean_median(result.cpc_aligned)}")
    typer.echo(f"view: run `seamless serve {out}` and open\n{result.link}")


@app.command()
def serve(
    root: Annotated[Path, typer.Argument(help="Folder holding file:// layers.")],
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = 1337,
) -> None:
    """Serve local layers to Neuroglancer (with CORS) until Ctrl-C."""
    from .neuroglancer import serve as run

    if not root.is_dir():
        raise InputError(f"{root} is not a folder")
    typer.echo(f"serving {root.resolve()} on http://127.0.0.1:{port} (Ctrl-C stops)")
    run(str(root), port)


@app.command()
def report(
    src: Annotated[str, typer.Option("--src", help="The unaligned source image layer.")],
    dst: Annotated[str, typer.Option("--dst", help="The alignment's destination folder (holds image, cpc, cpc_source).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for index.html and its PNGs (default: DST/report for a local DST, else ./report).")] = None,
    z: Annotated[Optional[str], typer.Option("--z", help="Sections A:B (B excluded) to report (default: all of the aligned image).")] = None,
    thumb_mip: Annotated[Optional[int], typer.Option("--thumb-mip", min=0, help="MIP of the thumbnails (default: the coarsest whose larger side is >= 256 px).")] = None,
    worst: Annotated[int, typer.Option("--worst", min=1, help="How many worst sections (with thumbnails) and worst CPC windows to list.")] = 5,
    serve_root: Annotated[Optional[str], typer.Option("--serve-root", help="Folder `seamless serve` serves, for links to local layers (default: the layers' common folder).")] = None,
) -> None:
    """Write an HTML quality report (CPC before/after, worst sections and windows, thumbnails) and print its path."""
    from .report import build_report, default_out_dir

    page = build_report(src, dst, out or default_out_dir(dst), z_range=parse_z(z) if z else None,
                        thumb_mip=thumb_mip, worst=worst, serve_root=serve_root)
    typer.echo(str(page))


@app.command()
def info(path: Annotated[str, typer.Argument(help="Layer path.")]) -> None:
    """Print a layer's kind, dtype, MIPs, bounds and field convention."""
    from .volumes import _fetch_info, normalise_path

    path = normalise_path(path)
    data = _fetch_info(path)
    if data is None:
        raise InputError(f"no layer at {path} (its info file is missing)")
    typer.echo(json.dumps(data, indent=2))


def _kind(name: str, allowed: tuple[str, ...]) -> Any:
    from .volumes import LayerKind

    if name not in allowed:
        raise InputError(f"unknown --kind {name!r}: use one of {', '.join(allowed)}")
    return LayerKind(name)


def _set_threads() -> None:
    """Torch threads = the CPUs this process owns (SEAMLESS_THREADS overrides, e.g. a pod's CPU limit).

    Oversubscribed threads make gradient-descent steps up to 10x slower on a busy machine (measured).
    """
    import os

    wanted = os.environ.get("SEAMLESS_THREADS")
    threads = int(wanted) if wanted and wanted.isdigit() and int(wanted) > 0 else _owned_cpus()
    import torch

    torch.set_num_threads(max(1, threads))


def _owned_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU limit (a pod's limits.cpu)."""
    import math
    import os

    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _on_signal(signum: int, frame: Any) -> None:
    """SIGTERM (a preempted pod) and Ctrl-C stop the step; atomic writes leave no torn chunk."""
    raise Interrupted(f"stopped by {signal.Signals(signum).name}; finished chunks are kept, rerun to continue")


def _unraisable(unraisable: Any) -> None:
    """cloud-files' connection pools raise AttributeError in __del__ when their client never connected (no
    or bad credentials): a traceback at exit after the real error was reported. Dropped; others printed."""
    where = getattr(unraisable.object, "__module__", "") or ""
    if unraisable.exc_type is AttributeError and where.startswith("cloudfiles.connectionpools"):
        return
    sys.__unraisablehook__(unraisable)


def split_marker_options(argv: list[str]) -> tuple[Any, list[str]]:
    """`seamless --marker URL [--upstream URL ...] STEP ...`: the restart-marker wrapper of plan steps."""
    if not argv or argv[0] not in ("--marker", "--upstream"):
        return None, argv
    import argparse

    from .markers import MarkedStep

    parser = argparse.ArgumentParser(prog="seamless", add_help=False, exit_on_error=False)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--upstream", action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    try:
        options = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit):
        raise InputError("write the marker options as --marker URL [--upstream URL ...] before the step's subcommand") from None
    if not options.command:
        raise InputError("--marker needs a step subcommand after it, e.g. seamless --marker URL render ...")
    return MarkedStep(options.marker, tuple(options.upstream), tuple(options.command)), list(options.command)


def run_command(argv: list[str]) -> tuple[int, bool]:
    """Run one command line; returns (exit code, skipped because its marker says it is done)."""
    import time

    try:
        marked, args = split_marker_options(list(argv))
        wanted = marked.current_hash() if marked else None
        done = marked.done_record(wanted) if marked else None
        if marked and done is not None:
            log.info("step already done with these inputs (marker %s): skipped", marked.marker)
            if isinstance(done.get("report"), dict) and done["report"]:  # its figures, as if it had just run
                typer.echo(json.dumps({**done["report"], "skipped": True}))
            return int(ExitCode.OK), True
        started = time.monotonic()
        _LAST_REPORT.clear()
        app(args=args, standalone_mode=True)  # typer reports usage errors itself, with exit code 2
    except SystemExit as exc:
        code = int(exc.code or 0) if not isinstance(exc.code, str) else int(ExitCode.USAGE)
        if code == 0 and marked is not None and wanted is not None:
            marked.finish(wanted, time.monotonic() - started, dict(_LAST_REPORT))
        return code, False
    except SeamlessError as exc:
        typer.echo(f"error: {exc}", err=True)
        return int(exc.exit_code), False
    except Exception:
        traceback.print_exc()
        return int(ExitCode.INTERNAL), False
    return int(ExitCode.OK), False


THEN = "--then"  # = seamless_core.plan.THEN (not imported from there: the plan would load pydantic into every step)


def split_steps(argv: list[str]) -> list[list[str]]:
    """A fused task's command line (`seamless STEP_A --then STEP_B ...`, seamless_core.plan.THEN) -> its steps."""
    parts: list[list[str]] = [[]]
    for arg in argv:
        if arg == THEN:
            parts.append([])
        else:
            parts[-1].append(arg)
    if len(parts) > 1 and not all(parts):
        raise InputError(f"{THEN} joins two step command lines: nothing may stand right before or after it")
    return parts


def run_steps(argv: list[str]) -> int:
    """Run the steps of one command line in order, in this process (imports paid once); stop at the first
    failure and return its exit code. Each step keeps its own restart marker: a rerun skips finished ones."""
    try:
        parts = split_steps(argv)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        return int(exc.exit_code)
    for i, part in enumerate(parts, 1):
        if len(parts) > 1:
            log.info("step %d of %d: %s", i, len(parts), part[1] if part[0] == "--marker" else part[0])
        code = run_command(part)[0]
        if code != 0:
            return code
    return int(ExitCode.OK)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one clear line per user error, a traceback only for bugs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sys.unraisablehook = _unraisable
    _set_threads()
    argv = sys.argv[1:] if argv is None else argv
    from .locks import step_lock

    try:
        lock = step_lock(argv)  # a plan step on its own (an Airflow task) shares its destination's lock
        with lock:
            return run_steps(argv)
    except SeamlessError as exc:
        typer.echo(f"error: {exc}", err=True)
        return int(exc.exit_code)


from . import cli_backfill, cli_workflow  # noqa: E402,F401  (register backfill; init, plan, align)
