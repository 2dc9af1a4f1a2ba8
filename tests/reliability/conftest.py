"""Fixtures of the reliability suite: one fork server, the small project and its clean run."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from seamless_core.plan import Plan

from .harness import Outcome, Zygote, zygote
from .layers import output_files
from .projects import plan_of, small_source, write_project


@pytest.fixture(scope="session")
def server() -> Iterator[Zygote]:
    with zygote() as running:
        yield running


@dataclass
class CleanRun:
    """The small project run once, step by step, with nothing killed: the reference for every fault."""

    root: Path
    source: Path
    project: Path
    plan: Plan
    files: dict[str, bytes]  # every output file by path relative to the destination
    outcomes: dict[str, Outcome]  # each step's run, with its traced read/write timings


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory: pytest.TempPathFactory, server: Zygote) -> CleanRun:
    root = tmp_path_factory.mktemp("reliability")
    source = small_source(root)
    project = write_project(root, source, "clean")
    plan = plan_of(project)
    logs = root / "clean-logs"
    logs.mkdir()
    outcomes = {}
    for step in plan.steps:
        outcome = server.run_one(plan.argv(step), logs / f"{step.id}.log")
        assert outcome.code == 0 and outcome.skipped is False, (step.id, (logs / f"{step.id}.log").read_text()[-2000:])
        outcomes[step.id] = outcome
    return CleanRun(root, source, project, plan, output_files(root / "clean"), outcomes)
