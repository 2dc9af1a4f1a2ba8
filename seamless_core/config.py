"""The project config: one YAML file that says what to align, where to write it and how.

Validated with pydantic before anything is written, so a typo in a key, stages out of order or a
section range outside the volume is one clear message listing every problem, not a failed task an hour
into a run. `check_against_source` adds the checks that need the source layer's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError
from .estimators.spec import PRESETS, StagesSpec, parse_stages, preset

Granularity = Literal["stage", "section"]
Fuse = Literal["none", "pairs", "section", "block"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SectionRange(_Strict):
    start: int = Field(ge=0, description="first section (z) of the range; it anchors the stack")
    stop: int = Field(gt=0, description="one past the last section")

    @model_validator(mode="after")
    def _ordered(self) -> SectionRange:
        if self.stop <= self.start:
            raise ValueError(f"stop ({self.stop}) must be greater than start ({self.start})")
        return self


class VoteConfig(_Strict):
    k: int = Field(3, ge=1, le=15, description="vote targets per section (odd: a strict majority must exist)")
    temperature: float = Field(1.0, gt=0, description="softmin temperature, px at the field's MIP (the last stage's)")
    blur: float = Field(2.0, ge=0, description="Gaussian sigma over which candidates' agreement is judged, "
                                                "px at the field's MIP")

    @field_validator("k")
    @classmethod
    def _odd(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"k must be odd so a strict majority of targets exists (got {k}); use {k - 1} or {k + 1}")
        return k


class BlockConfig(_Strict):
    size: int = Field(10, ge=2, description="sections per block; blocks overlap by one section and align in parallel")
    decay_dist: int = Field(100, ge=1, description="sections over which a block's stitch correction fades to zero")
    fill_targets: bool = Field(True, description="each block render takes its black pixels (outside the source, "
                                                 "cracks, debris, masked defects) from the block's section before it, "
                                                 "so a target's holes do not steer later sections' fields")


class RenderConfig(_Strict):
    mip: int = Field(0, ge=0, description="MIP of the final aligned image")
    chunk: int | None = Field(None, ge=1, description="processing chunk edge (px), a multiple of the storage chunk")


class CpcConfig(_Strict):
    mip: int = Field(1, ge=0, description="MIP at which neighbouring sections are correlated")
    patch: int = Field(32, ge=4, description="correlation window edge in px at that MIP (one CPC voxel each)")


class Resources(_Strict):
    """What a task pod asks Kubernetes for (ignored by the local executor)."""

    gpu: int = Field(1, ge=0, description="nvidia.com/gpu per field/render pod")
    cpu: str = Field("4", description="CPU request, Kubernetes quantity")
    memory: str = Field("16Gi", description="memory request, Kubernetes quantity")


class ProjectConfig(_Strict):
    source: str = Field(description="image layer to align (file://, gs://, s3:// or a local folder)")
    mask: str | None = Field(None, description="defect mask layer (nonzero = defect): never attracts a field, black in the output")
    destination: str = Field(description="folder (file://, gs://, s3://) that receives every layer the run writes")
    bbox: tuple[int, int, int, int] | None = Field(None, description="x0, y0, x1, y1 at MIP 0; default: the whole section")
    sections: SectionRange
    bad_sections: list[int] = Field(default_factory=list, description="missing or damaged sections: aligned, but never a target or block start")
    stages: str | list[dict[str, Any]] = Field(
        "serial", description="stage preset (serial: real neighbours; exact: copies of one section) or a list of {mip, estimators}")
    vote: VoteConfig = Field(default_factory=VoteConfig)
    blocks: BlockConfig = Field(default_factory=BlockConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    cpc: CpcConfig = Field(default_factory=CpcConfig)
    chunk: int | None = Field(None, ge=1, description="processing chunk edge (px) of field steps; default: the storage chunk")
    pad: int = Field(64, ge=0, description="context pixels per side of each field chunk, at each stage's MIP")
    batch: int = Field(1, ge=1, le=256, description="field chunks per estimator call (compute_field --batch): 4-16 fill a GPU")
    granularity: Granularity = Field("section", description="one compute_field step per MIP stage ('stage') or all stages in one ('section')")
    fuse: Fuse = Field("pairs", description="Airflow tasks: one per step ('none'); a vote with its block render, a compose "
                                            "with its final render, a block's CPCs ('pairs'); a section's chain and its "
                                            "final steps ('section'), or a block's ('block'): fewer process and pod starts")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    fill_missing: bool = Field(False, description="treat missing source chunks as black instead of failing")
    resources: Resources = Field(default_factory=Resources)

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(value, str) and value not in PRESETS:
            raise ValueError(f"unknown stage preset {value!r}: choose one of {', '.join(sorted(PRESETS))} or list the stages")
        if isinstance(value, list):
            parse_stages(value)  # raises InputError, which pydantic reports under 'stages'
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"cpu|cuda(:\d+)?|auto", value):  # seamless_core.devices' rule, without torch
            raise ValueError(f"unknown device {value!r}: use cpu, cuda, cuda:N or auto")
        return value

    @field_validator("source", "destination")
    @classmethod
    def _scheme(cls, value: str) -> str:
        from .paths import SUPPORTED_SCHEMES, normalise_path

        try:
            return normalise_path(value)
        except InputError as exc:
            raise ValueError(f"{exc} (supported: {', '.join(SUPPORTED_SCHEMES)})") from None

    @model_validator(mode="after")
    def _consistent(self) -> ProjectConfig:
        if self.destination.rstrip("/") == self.source.rstrip("/") or self.source.startswith(self.destination.rstrip("/") + "/"):
            raise ValueError("destination must not be the source nor contain it: every layer of the run is written under it")
        if self.bbox and (self.bbox[2] <= self.bbox[0] or self.bbox[3] <= self.bbox[1]):
            raise ValueError(f"bbox {list(self.bbox)} is empty: write it as x0, y0, x1, y1 with x1 > x0 and y1 > y0")
        finest = self.stage_spec.stages[-1].mip
        if self.render.mip > finest:
            raise ValueError(f"render.mip ({self.render.mip}) is coarser than the finest stage (MIP {finest}); the field would be finer than the image")
        outside = [z for z in self.bad_sections if not self.sections.start <= z < self.sections.stop]
        if outside:
            raise ValueError(f"bad_sections {outside} lie outside sections {self.sections.start}:{self.sections.stop}")
        return self

    @property
    def stage_spec(self) -> StagesSpec:
        return preset(self.stages) if isinstance(self.stages, str) else parse_stages(self.stages)


def parse_config(data: Any, origin: str = "config") -> ProjectConfig:
    """Validate a config mapping; every problem is listed in one InputError, with its key path."""
    if not isinstance(data, dict):
        raise InputError(f"{origin}: expected a mapping of keys (source, destination, sections, ...), got {type(data).__name__}")
    try:
        return ProjectConfig.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {_message(e)}" for e in exc.errors())
        raise InputError(f"{origin} is not a valid project config:\n{problems}") from None


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key (check its spelling against `seamless init`'s example)"
    if error["type"] == "missing":
        return "required key is missing"
    return str(error["msg"]).removeprefix("Value error, ")


def load_config(path: str | Path) -> ProjectConfig:
    """Read and validate a project YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"no project config at {path}: write one with `seamless init --src LAYER --dst FOLDER > {path.name}`") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data, str(path))


def check_against_source(config: ProjectConfig) -> None:
    """Checks that need the source's metadata: sections and bbox inside it, the MIPs the stages read."""
    from .volumes import LayerKind, check_same_grid, open_layer

    src = open_layer(config.source, LayerKind.IMAGE, fill_missing=config.fill_missing, role="source")
    bounds = src.bounds(0)
    z0, z1 = bounds.start[2], bounds.stop[2]
    if config.sections.start < z0 or config.sections.stop > z1:
        raise InputError(f"sections {config.sections.start}:{config.sections.stop} lie outside the source's "
                         f"sections {z0}:{z1} ({config.source}); choose a range inside it")
    if config.bbox:
        x0, y0, x1, y1 = config.bbox
        if x0 < bounds.start[0] or y0 < bounds.start[1] or x1 > bounds.stop[0] or y1 > bounds.stop[1]:
            raise InputError(f"bbox {list(config.bbox)} extends beyond the source's bounds "
                             f"{bounds.start[:2]}..{bounds.stop[:2]} at MIP 0")
    needed = sorted({s.mip for s in config.stage_spec.stages} | {config.cpc.mip, config.render.mip})
    missing = [m for m in needed if m not in src.mips]
    if missing:
        raise InputError(f"source {config.source} has no MIP {missing} (it has {src.mips}); build them first with "
                         f"`seamless downsample --src {config.source} --mip 0 --dst-mip {max(needed)}`")
    if config.mask:
        mask = open_layer(config.mask, LayerKind.MASK, fill_missing=True, role="mask")
        check_same_grid(src, 0, mask, 0, "source and mask")


EXAMPLE = """\
# SEAMLeSS alignment project. Validate with `seamless plan {name}`; run with `seamless align {name}`.
source: {source}              # image layer to align
# mask: file:///data/defects          # optional defect mask (nonzero = defect)
destination: {destination}    # every output layer goes under here (docs/layout.md)
sections: {{start: {start}, stop: {stop}}}  # z range; `start` anchors the stack
# bbox: [0, 0, {width}, {height}]           # x0, y0, x1, y1 at MIP 0 (default: whole section)
bad_sections: []                       # damaged/missing z: never a target or block start
stages: serial                         # serial: block matching at MIP 2, for real neighbouring sections;
                                       # exact: + finetuner at MIP 1 and 0, exact on copies of one section
                                       # but it morphs real neighbours into each other (docs/estimators.md);
                                       # or a list of {{mip, estimators}}, coarse to fine:
#  - {{mip: 2, estimators: [{{name: block_matching}}]}}
#  - {{mip: 1, estimators: [{{name: finetuner}}]}}
vote: {{k: 3, temperature: 1.0, blur: 2.0}}  # k previous sections vote on each field
blocks: {{size: 10, decay_dist: 100, fill_targets: true}}  # parallel blocks; stitch corrections fade over
                                       # decay_dist sections; block renders (targets) fill holes from z-1
render: {{mip: 0}}                       # final image MIP
cpc: {{mip: 1, patch: 32}}               # quality map: correlation of z with z-1
pad: 64                                # field context px per chunk side
batch: 1                               # field chunks per estimator call; 4-16 on a GPU
granularity: section                   # section: one compute_field per target; stage: one per MIP stage
fuse: pairs                            # Airflow tasks: none (one per step), pairs, section or block (fewer task starts)
device: cpu                            # cpu, cuda, auto
resources: {{gpu: 1, cpu: "4", memory: 16Gi}}  # per pod on Kubernetes
"""


def example_config(source: str, destination: str) -> str:
    """A commented config for `source`, with its real section range and size filled in."""
    from .volumes import LayerKind, normalise_path, open_layer

    src = open_layer(source, LayerKind.IMAGE, role="--src")
    bounds = src.bounds(0)
    text = EXAMPLE.format(name="project.yaml", source=src.path, destination=normalise_path(destination),
                          start=bounds.start[2], stop=bounds.stop[2], width=bounds.stop[0], height=bounds.stop[1])
    parse_config(yaml.safe_load(text), "the generated example")  # the example must always validate
    return text
