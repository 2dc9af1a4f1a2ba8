"""Which estimators run at which MIP: the stage spec, validated before any work starts.

A stage names a MIP and a chain of estimators; each refines the field of the one before, and the first
starts from the coarser stage's field. Written in YAML or JSON as, for example:

    stages:
      - {mip: 2, estimators: [{name: block_matching}]}
      - {mip: 1, estimators: [{name: finetuner}]}
      - {mip: 0, estimators: [{name: finetuner, params: {smoothness: 0.005}}]}
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import InputError
if TYPE_CHECKING:
    from .base import Estimator

# name -> "module:factory"; factories take the params as keyword arguments and validate them.
REGISTRY: dict[str, str] = {
    "block_matching": "seamless_core.estimators.block_matching:BlockMatching",
    "finetuner": "seamless_core.estimators.finetuner:Finetuner",
    "pyramid": "seamless_core.estimators.pyramid:PyramidEstimator",
}


class EstimatorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="block_matching, finetuner or pyramid")
    params: dict[str, Any] = Field(default_factory=dict, description="the estimator's parameters")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in REGISTRY:
            raise ValueError(f"unknown estimator {name!r}: choose one of {', '.join(sorted(REGISTRY))}")
        return name


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mip: int = Field(ge=0, le=12, description="MIP level this stage works at")
    estimators: list[EstimatorSpec] = Field(min_length=1)


class StagesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stages: list[StageSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _coarse_to_fine(self) -> StagesSpec:
        mips = [s.mip for s in self.stages]
        if any(b >= a for a, b in zip(mips, mips[1:])):
            raise ValueError(f"stage MIPs must go strictly from coarse to fine (decreasing), got {mips}")
        return self


DEFAULT_STAGES: list[dict[str, Any]] = [
    {"mip": 2, "estimators": [{"name": "block_matching"}]},
    {"mip": 1, "estimators": [{"name": "finetuner"}]},
    {"mip": 0, "estimators": [{"name": "finetuner"}]},
]


#: Serial alignment of real neighbouring sections (50 nm apart, different content): stop at MIP 2 with
#: a stiff field so the aligner removes section misalignment without morphing one section into the
#: next; align_pair upsamples the field to MIP 0 for rendering. Filled in from bench/align_quality.py.
SERIAL_STAGES: list[dict[str, Any]] = [
    {"mip": 2, "estimators": [{"name": "block_matching"}]},
]

#: Named stage specs: "exact" (the defaults: exact recovery of deformations of the same section, down
#: to MIP 0) and "serial" (real neighbours: see SERIAL_STAGES). A finetuner stage between real
#: neighbours (e.g. block matching + finetuner at MIP 2, finetuner at MIP 1) scores well on the patch
#: metrics but visibly morphs the sections along a chain (docs/estimators.md), so no preset offers it.
PRESETS: dict[str, list[dict[str, Any]]] = {"exact": DEFAULT_STAGES, "serial": SERIAL_STAGES}


def preset(name: str) -> StagesSpec:
    """The validated stage spec of a named preset (exact, serial)."""
    if name not in PRESETS:
        raise InputError(f"unknown stage preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return parse_stages(PRESETS[name])


def parse_stages(data: list[dict[str, Any]] | dict[str, Any] | None) -> StagesSpec:
    """Validate a stage spec (None = the defaults); errors name the offending field."""
    payload = {"stages": DEFAULT_STAGES} if data is None else (data if isinstance(data, dict) else {"stages": data})
    try:
        return StagesSpec.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InputError(f"invalid stage spec: {problems}") from None


def build_estimator(spec: EstimatorSpec) -> Estimator:
    """Instantiate one estimator; bad parameters become an InputError naming the estimator."""
    module_name, _, attr = REGISTRY[spec.name].partition(":")
    factory: Callable[..., Estimator] = getattr(importlib.import_module(module_name), attr)
    try:
        return factory(**spec.params)
    except (TypeError, ValueError) as exc:
        raise InputError(f"estimator {spec.name}: {exc}") from None
