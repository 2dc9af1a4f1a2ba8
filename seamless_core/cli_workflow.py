"""`seamless init | plan | align`: the whole workflow from one project config, run locally."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli import app, parse_z
from .errors import InputError
from .plan import Plan

ConfigArg = Annotated[Path, typer.Argument(help="Project config (YAML); `seamless init` writes an example.")]
ZRange = Annotated[Optional[str], typer.Option("--z", help="Section range A:B (B excluded); overrides the config's sections.")]


def load_project(path: Path, z: str | None):  # type: ignore[no-untyped-def]
    """The validated config, with --z applied, checked against the source's metadata."""
    from .config import check_against_source, load_config

    config = load_config(path)
    if z:
        start, stop = parse_z(z)
        config = config.model_copy(update={"sections": config.sections.model_copy(update={"start": start, "stop": stop})})
        outside = [b for b in config.bad_sections if not start <= b < stop]
        config = config.model_copy(update={"bad_sections": [b for b in config.bad_sections if b not in outside]})
    check_against_source(config)
    return config


@app.command()
def init(
    src: Annotated[str, typer.Option("--src", help="Image layer to align.")],
    dst: Annotated[str, typer.Option("--dst", help="Destination folder for the run's layers.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the config here instead of printing it.")] = None,
) -> None:
    """Write a commented example project config for a source volume (its real range filled in)."""
    from .config import example_config

    text = example_config(src, dst)
    if out is None:
        typer.echo(text, nl=False)
        return
    if out.exists():
        raise InputError(f"{out} exists; choose another --out or delete it first (it is never overwritten)")
    out.write_text(text)
    typer.echo(f"wrote {out}; check it with `seamless plan {out}`")


@app.command()
def plan(
    config: ConfigArg,
    z: ZRange = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every step (id, kind, deps, command) as JSON.")] = False,
) -> None:
    """Validate a project config and show the steps the workflow would run."""
    from .plan import build_plan

    built = build_plan(load_project(config, z))
    if as_json:
        steps = [{"id": s.id, "kind": s.kind, "label": s.label, "z": s.z, "mip": s.mip, "block": s.block,
                  "deps": list(s.deps), "argv": built.argv(s)} for s in built.steps]
        json.dump(steps, sys.stdout, indent=1)
        typer.echo("")
        return
    typer.echo(f"{len(built.steps)} steps over sections {built.config.sections.start}:{built.config.sections.stop}")
    for block in built.blocks:
        typer.echo(f"  block {block.index}: sections {block.start}..{block.stop} -> {built.layout.block_image(block.index)}")
    for kind, count in built.kinds().items():
        typer.echo(f"  {kind}: {count}")


def refuse_black_block_starts(plan: Plan) -> None:
    """Before any step runs: every block's first section must hold tissue (its copy step checks it again).

    A section whose chunks are missing is left to the first step that reads it, which names the chunk.
    """
    from .errors import LayerError
    from .geometry import BBox
    from .steps.copy import empty_sections, refuse_empty_sections
    from .volumes import LayerKind, open_layer

    if not plan.blocks:
        return
    src = open_layer(plan.config.source, LayerKind.IMAGE, fill_missing=plan.config.fill_missing, role="source")
    x0, y0, x1, y1 = plan.config.bbox or (*src.bounds(0).start[:2], *src.bounds(0).stop[:2])
    empty: list[int] = []
    for block in plan.blocks:
        try:
            empty += empty_sections(src, BBox((x0, y0, block.start), (x1, y1, block.start + 1), 0))
        except LayerError:
            continue
    if empty:
        refuse_empty_sections(src, BBox((x0, y0, 0), (x1, y1, 1), 0), "start a block", empty)


@app.command()
def align(
    config: ConfigArg,
    z: ZRange = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Steps run at once (worker processes).")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Redo every step, even those whose marker is current.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write the HTML quality report at the end.")] = True,
) -> None:
    """Run the whole workflow locally: blocks, stitching, compose with decay, render, CPC, report."""
    from .executor import StepFailed, execute
    from .neuroglancer import viewer_link
    from .plan import build_plan

    built = build_plan(load_project(config, z))
    refuse_black_block_starts(built)
    summary = execute(built, workers=workers, force=force)
    typer.echo(f"steps run: {len(summary.ran)}, skipped (already done): {len(summary.skipped)}, failed: "
               f"{len(summary.failed)}, not started: {summary.not_started}, {summary.seconds:.1f} s")
    if summary.failed:
        raise StepFailed(f"step {summary.failed[0]} failed; fix the cause and rerun `seamless align {config}`: "
                         "finished steps are kept and skipped", summary.exit_code)
    if report:
        from .report import build_report, default_out_dir

        page = build_report(built.config.source, built.layout.destination, default_out_dir(built.layout.destination),
                            z_range=(built.config.sections.start, built.config.sections.stop))
        typer.echo(f"report: {page}")
    local = [p.removeprefix("file://") for p in (built.config.source, built.layout.destination) if p.startswith("file://")]
    serve_root = os.path.commonpath(local) if len(local) == 2 else None  # one `seamless serve` shows both
    link = viewer_link([("source", built.config.source), ("aligned", built.layout.image)], serve_root=serve_root)
    typer.echo(f"aligned image: {built.layout.image}")
    typer.echo(f"view: {'run `seamless serve ' + serve_root + '` and open ' if serve_root else ''}{link}")
