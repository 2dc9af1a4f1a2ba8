"""The plan cut into one run per block: what a section-range backfill runs, and how blocks map to dates.

Airflow backfills iterate a timetable's dates, not sections; the `seamless_align_blocks` DAG (docs/backfill.md)
maps block b of the plan to one partitioned run with partition date EPOCH + b days and a readable partition
key (`sections 11-20 (block 1)`). This module is that mapping, kept free of Airflow so `seamless backfill`,
the timetable and the DAG file share one definition:

* a block's run owns its serial chain (start copy, compute_field, vote, block render), its stitch (b >= 1)
  and the compose, final render and CPC of the sections it outputs: (s_b, s_b+1] (block 0 also s_0 and any
  sections before it);
* every run has the same task set, one task per *template*: a step's kind at its position in the block
  (`p3.vote` = vote of section s_b + 3), so the grid shows one row per position and one column per block;
* what a run needs from earlier blocks (their vote and render of the shared section, their stitch fields)
  is listed per block, so a sensor can wait for exactly those steps' restart markers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .config import ProjectConfig, parse_config
from .errors import InputError
from .plan import Plan, Step

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # block b <-> partition date EPOCH + b days
_KEY = re.compile(r"^sections (-?\d+)-(-?\d+) \(block (\d+)\)$")
_EXTRA = re.compile(r"^[tm]\d+$")  # the target rank / MIP stage parts of a compute_field id


def partition_key(first: int, last: int, index: int) -> str:
    """The run's label in the UI and its partition key: `sections 11-20 (block 1)` (both ends included)."""
    return f"sections {first}-{last} (block {index})"


def block_of_key(key: str) -> int:
    """The block index a partition key names; a clear error for anything else."""
    match = _KEY.match(key.strip()) if isinstance(key, str) else None
    if not match:
        raise InputError(f"partition key {key!r} names no block of sections: expected e.g. "
                         f"{partition_key(11, 20, 1)!r}")
    return int(match.group(3))


def block_date(index: int) -> datetime:
    """The partition date of block `index` (UTC midnight, EPOCH + index days)."""
    return EPOCH + timedelta(days=index)


def load_project(path: str | os.PathLike[str]) -> ProjectConfig:
    """A project YAML as the DAG files read it: relative local paths are relative to the file's folder."""
    import yaml

    path = Path(path).expanduser().resolve()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no project config at {path}") from None
    if isinstance(raw, dict):
        for key in ("source", "destination", "mask"):
            value = raw.get(key)
            if value and "://" not in value and not os.path.isabs(value):
                raw[key] = str((path.parent / value).resolve())
    return parse_config(raw, str(path))


@dataclass(frozen=True)
class BlockRun:
    """One run of a section-range backfill: block `index`, writing final sections first..last."""

    index: int
    first: int
    last: int  # inclusive

    @property
    def key(self) -> str:
        return partition_key(self.first, self.last, self.index)

    @property
    def date(self) -> datetime:
        return block_date(self.index)


@dataclass(frozen=True)
class Template:
    """One task of the per-block DAG: a step kind at a position in the block, the same for every run."""

    id: str
    kind: str
    label: str
    gpu: bool
    deps: frozenset[str]  # templates of the same run it waits for (union over blocks)
    waits: frozenset[str]  # kinds of earlier blocks' steps it waits for (see BlockRuns.external)
    priority: int


@dataclass
class BlockRuns:
    """A plan seen as one run per block: ownership, templates, and what each run needs from earlier blocks."""

    plan: Plan
    runs: tuple[BlockRun, ...] = field(init=False)
    _owned: dict[int, dict[str, Step]] = field(init=False, repr=False)
    _templates: list[Template] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        blocks = self.plan.blocks
        if not blocks:
            raise InputError(f"sections {self.plan.config.sections.start}:{self.plan.config.sections.stop} make no "
                             "block (a block needs two good sections): nothing to backfill")
        start = self.plan.config.sections.start
        self.runs = tuple(BlockRun(b.index, start if b.index == 0 else b.start + 1, b.stop) for b in blocks)
        self._owned = {r.index: {} for r in self.runs}
        for step in self.plan.steps:
            block = self.owner(step)
            template = self.template_id(step, block)
            if template in self._owned[block]:  # a plan id scheme this mapping does not know yet
                raise ValueError(f"steps {self._owned[block][template].id} and {step.id} both map to {template}")
            self._owned[block][template] = step

    # --- the mapping -----------------------------------------------------------------------------
    def owner(self, step: Step) -> int:
        """The block whose run executes `step`: its chain block, else the block that outputs its section."""
        if step.block is not None:
            return step.block
        assert step.z is not None, step.id
        return self.run_of_section(step.z).index

    def run_of_section(self, z: int) -> BlockRun:
        for run in self.runs:
            if z <= run.last:
                return run
        raise InputError(f"section {z} lies after the project's sections (last {self.runs[-1].last})")

    def template_id(self, step: Step, block: int | None = None) -> str:
        """`p3.vote`, `p3.t1.compute_field`, `p0.start`, `stitch`: the step's task id in every block's run."""
        if step.kind == "stitch":
            return "stitch"
        block = self.owner(step) if block is None else block
        assert step.z is not None, step.id
        position = step.z - self.plan.blocks[block].start
        extras = [p for p in step.id.split(".") if _EXTRA.match(p)] if step.kind == "compute_field" else []
        name = "start" if step.kind == "block_start" else step.kind
        return ".".join([f"p{position}", *extras, name])

    def template_label(self, step: Step, block: int) -> str:
        """The step's label with z relative to the block start: `z=s+3 mip=0 vote`."""
        if step.kind == "stitch":
            return "stitch onto the previous block"
        assert step.z is not None
        position = step.z - self.plan.blocks[block].start
        relative = "z=s" if position == 0 else f"z=s{position:+d}"
        return step.label.replace(f"z={step.z}", relative, 1)

    def by_key(self, key: str) -> BlockRun:
        index = block_of_key(key)
        if not 0 <= index < len(self.runs) or self.runs[index].key != key.strip():
            raise InputError(f"partition key {key!r} is not a block of this project; its blocks are "
                             f"{self.runs[0].key!r} .. {self.runs[-1].key!r}")
        return self.runs[index]

    def for_range(self, start: int, stop: int) -> list[BlockRun]:
        """The runs whose output sections meet [start, stop)."""
        if stop <= start:
            raise InputError(f"section range {start}:{stop} is empty or reversed")
        chosen = [r for r in self.runs if r.first < stop and r.last >= start]
        if not chosen:
            first, last = self.runs[0].first, self.runs[-1].last
            raise InputError(f"sections {start}:{stop} lie outside the project's sections {first}:{last + 1}")
        return chosen

    # --- one run's steps -------------------------------------------------------------------------
    def steps(self, block: int) -> dict[str, Step]:
        """Template id -> the plan step it runs in block `block`'s run."""
        return self._owned[block]

    def step(self, block: int, template: str) -> Step | None:
        return self._owned[block].get(template)

    def external(self, block: int, kind: str | None = None) -> list[Step]:
        """Steps of earlier blocks that `block`'s steps wait for (optionally only those of one kind)."""
        owned = {s.id for s in self._owned[block].values()}
        wanted = sorted({d for s in self._owned[block].values() for d in s.deps if d not in owned})
        steps = [self.plan.by_id[d] for d in wanted]
        return [s for s in steps if kind is None or s.kind == kind]

    def templates(self) -> list[Template]:
        """Every block's templates merged: deps and waits are the union over blocks (exact when blocks agree)."""
        if self._templates is None:
            self._templates = self._merge()
        return self._templates

    def _merge(self) -> list[Template]:
        priorities = self.plan.priorities()
        merged: dict[str, dict[str, Any]] = {}
        for run in self.runs:
            owned = self._owned[run.index]
            template_of = {s.id: t for t, s in owned.items()}
            for template, step in owned.items():
                entry = merged.setdefault(template, {"kind": step.kind, "label": self.template_label(step, run.index),
                                                     "gpu": step.gpu, "deps": set(), "waits": set(), "priority": 0})
                for dep in step.deps:
                    if dep in template_of:
                        entry["deps"].add(template_of[dep])
                    else:
                        entry["waits"].add(self.plan.by_id[dep].kind)
                entry["priority"] = max(entry["priority"], priorities[step.id])
        return [Template(t, e["kind"], e["label"], e["gpu"], frozenset(e["deps"]), frozenset(e["waits"]), e["priority"])
                for t, e in merged.items()]

    def wait_kinds(self) -> list[str]:
        """Kinds of earlier blocks' steps any run waits for (one sensor each in the DAG)."""
        return sorted({k for t in self.templates() for k in t.waits})


def backfill_command(runs: Iterable[BlockRun], *, dag_id: str, reprocess: str = "none",
                     max_active_runs: int | None = None, dry_run: bool = False) -> list[str]:
    """`airflow backfill create` over the partition dates of these runs (first and last included)."""
    if reprocess not in ("none", "failed", "completed"):
        raise InputError(f"--reprocess {reprocess!r}: use none (skip done blocks), failed (redo failed blocks) "
                         "or completed (redo every block)")
    chosen = sorted(runs, key=lambda r: r.index)
    if not chosen:
        raise InputError("no block to backfill")
    argv = ["airflow", "backfill", "create", "--dag-id", dag_id,
            "--from-date", chosen[0].date.isoformat(), "--to-date", chosen[-1].date.isoformat(),
            "--reprocess-behavior", reprocess]
    if max_active_runs is not None:
        argv += ["--max-active-runs", str(max_active_runs)]
    if dry_run:
        argv.append("--dry-run")
    return argv
