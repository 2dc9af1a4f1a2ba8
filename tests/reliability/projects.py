"""Small projects over the shared sample: seconds per whole run, every step kind of the workflow.

Six deformed 256² copies of real ssTEM sections (storage chunks of 64 px), the serial stage preset with
16 px of context, blocks of 3 (so one stitch), k = 3: 40 steps (7 compute_field, 5 vote, 3 block
renders, 6 compose, 6 renders, CPC). One run takes about 6 s with `seamless align --workers 2`.
"""

from __future__ import annotations

from pathlib import Path

from seamless_core.config import load_config
from seamless_core.plan import Plan, build_plan

from workflow_helpers import deformed_stack

SIZE, SECTIONS, CHUNK = 256, 6, 64
PROJECT = """\
source: {source}
destination: {destination}
sections: {{start: 0, stop: {stop}}}
stages: serial
pad: 16
blocks: {{size: 3, decay_dist: 1000}}
vote: {{k: 3}}
render: {{mip: 0, chunk: 128}}
cpc: {{mip: 1, patch: 16}}
fuse: none
"""


def small_source(root: Path) -> Path:
    """The six-section source layer (MIPs 0-3) under `root`."""
    return deformed_stack(root, list(range(SECTIONS)), SIZE, chunk=CHUNK, max_translation=6.0,
                          cracked=(), debris=()).path


def write_project(root: Path, source: Path, name: str, extra: str = "") -> Path:
    """A project writing into root/name; returns its YAML path."""
    path = root / f"{name}.yaml"
    path.write_text(PROJECT.format(source=source, destination=root / name, stop=SECTIONS) + extra)
    return path


def plan_of(project: Path, z: str | None = None) -> Plan:
    config = load_config(project)
    if z:
        start, stop = (int(v) for v in z.split(":"))
        config = config.model_copy(update={"sections": config.sections.model_copy(update={"start": start, "stop": stop})})
    return build_plan(config)


def outputs_of(args: tuple[str, ...] | list[str]) -> list[str]:
    """The layers a step's command line writes (--dst, and --agreement for a vote)."""
    return [args[i + 1] for i, a in enumerate(args) if a in ("--dst", "--agreement")]
