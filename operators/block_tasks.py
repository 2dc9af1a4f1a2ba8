"""Tasks of the `seamless_align_blocks` DAG: one task per block *template*, resolved per run.

Every run of that DAG is one block of sections (its partition key, operators/section_timetable.py), and
every run has the same tasks (`p3.vote` = the vote of the block's start + 3). When a task runs it reads the
run's partition key, finds the plan step of that block (seamless_core.block_runs) and runs exactly the
command `seamless align` would (`plan.argv`, restart markers included, so steps already done by either
executor or the other DAG are skipped). A template the block lacks (a shorter last block) is skipped.

What a block needs from earlier blocks (the previous block's vote and render of the shared section, the
stitch fields of earlier blocks) is waited for by `EarlierBlocksSensor` in reschedule mode: it succeeds
once those steps' restart markers are current (the steps finished with the inputs this plan gives them),
whoever ran them, and fails after its timeout naming what is still missing.
"""

from __future__ import annotations

import os
from datetime import timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout, AirflowSkipException

from .local import SeamlessLocalOperator, executor, gpu_pool

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator

    from seamless_core.block_runs import BlockRuns, Template
    from seamless_core.plan import Step

WAIT_POKE_ENV = "SEAMLESS_WAIT_POKE"  # seconds between two looks at the markers (default 60)
WAIT_TIMEOUT_ENV = "SEAMLESS_WAIT_TIMEOUT"  # seconds before a wait fails (default 24 h)
NO_KEY = ("this DAG runs one block of sections per run and this run has no partition key: start it with a "
          "backfill (`seamless backfill PROJECT --z A:B`, or `airflow backfill create`) or trigger it with a "
          "partition key such as {example!r}")


class BlockRef:
    """Which template a task stands for; finds the run's block and the plan step at run time."""

    def __init__(self, runs: BlockRuns, template: str) -> None:
        self.runs, self.template = runs, template

    def block(self, context: Any) -> int:
        from seamless_core.errors import InputError

        key = context.get("partition_key") if hasattr(context, "get") else None
        if not key and hasattr(context, "get") and context.get("dag_run") is not None:
            key = getattr(context["dag_run"], "partition_key", None)
        if not key:
            raise AirflowFailException(NO_KEY.format(example=self.runs.runs[0].key))
        try:
            return self.runs.by_key(str(key)).index
        except InputError as exc:
            raise AirflowFailException(str(exc)) from None

    def step(self, context: Any) -> Step:
        block = self.block(context)
        step = self.runs.step(block, self.template)
        if step is None:
            raise AirflowSkipException(f"block {block} ({self.runs.runs[block].key}) has no step {self.template}")
        return step

    def argv(self, context: Any) -> list[str]:
        return self.runs.plan.argv(self.step(context))


class _BlockResolved:
    """Mixin for the step operators: the command line comes from the run's block, not from parse time."""

    block_ref: BlockRef | None = None
    shallow_copy_attrs = ("block_ref",)  # the plan is shared, never deep-copied per task

    def resolved_step(self, context: Any) -> list[str]:
        assert self.block_ref is not None
        step = self.block_ref.step(context)
        self.log.info("block run %s: step %s (%s)", context.get("partition_key"), step.id, step.label)  # type: ignore[attr-defined]
        return self.block_ref.runs.plan.argv(step)


class BlockStepOperator(_BlockResolved, SeamlessLocalOperator):
    """The local twin (a `python -m seamless_core` child), running this run's block's step."""

    def __init__(self, *, block_ref: BlockRef, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.block_ref = block_ref


@lru_cache(maxsize=1)
def _block_pod_class() -> type:
    """The pod operator variant (the Kubernetes provider is imported only when asked for)."""
    from .local import _pod_class

    class BlockPodOperator(_BlockResolved, _pod_class()):  # type: ignore[misc]
        def __init__(self, *, block_ref: BlockRef, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.block_ref = block_ref

    return BlockPodOperator


class EarlierBlocksSensor(BaseSensorOperator):
    """Wait until the earlier blocks' steps of one kind that this run's block needs are done (markers)."""

    ui_color = "#f4ecd8"
    shallow_copy_attrs = ("runs",)

    def __init__(self, *, runs: BlockRuns, kind: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runs, self.kind = runs, kind

    def missing(self, context: Any) -> list[str]:
        """Step ids (of this run's needs) whose marker is absent or out of date."""
        from seamless_core.errors import SeamlessError
        from seamless_core.markers import MarkedStep

        block = BlockRef(self.runs, self.task_id).block(context)
        needed = self.runs.external(block, self.kind)
        if not needed:
            raise AirflowSkipException(f"block {block} needs no {self.kind} step of an earlier block")
        layout, missing = self.runs.plan.layout, []
        for step in needed:
            marked = MarkedStep(layout.marker(step.id), tuple(layout.marker(d) for d in step.deps), step.args)
            try:
                done = marked.is_done()
            except SeamlessError:  # an upstream marker of that step is missing: it is not done either
                done = False
            if not done:
                missing.append(step.id)
        return missing

    def poke(self, context: Any) -> bool:
        missing = self.missing(context)
        if missing:
            self.log.info("waiting for earlier blocks' steps: %s", ", ".join(missing))
        return not missing

    def execute(self, context: Any) -> Any:
        try:
            return super().execute(context)
        except AirflowSensorTimeout as exc:
            missing = self.missing(context)
            raise AirflowSensorTimeout(
                f"{exc} Still not done (no current restart marker): {', '.join(missing)}. They belong to earlier "
                "blocks: backfill those blocks too (or run `seamless align`), then clear this task") from None


def _seconds(env: str, default: float) -> float:
    value = os.environ.get(env)
    try:
        return float(value) if value else default
    except ValueError:
        raise ValueError(f"{env}={value!r} is not a number of seconds") from None


def template_task(template: Template, runs: BlockRuns, *, kind: str | None = None, **kwargs: Any) -> BaseOperator:
    """The task of one template: task id = template id, the step's label with z relative to the block start."""
    kind = kind or executor()
    sample = next(s for r in runs.runs if (s := runs.step(r.index, template.id)) is not None)
    if template.gpu:
        kwargs.setdefault("pool", gpu_pool())
    common = dict(task_id=template.id, task_display_name=template.label, step=runs.plan.argv(sample),
                  pool_kind="gpu" if template.gpu else "cpu", priority_weight=template.priority,
                  weight_rule="absolute", block_ref=BlockRef(runs, template.id),
                  trigger_rule="none_failed",  # an upstream template this block lacks is skipped, not failed
                  **kwargs)
    if kind == "local":
        return BlockStepOperator(**common)
    if kind == "kubernetes":
        return _block_pod_class()(**common)
    raise ValueError(f"unknown executor {kind!r}: use local or kubernetes")


def wait_task(kind: str, runs: BlockRuns, **kwargs: Any) -> EarlierBlocksSensor:
    """The sensor for one kind of earlier blocks' steps (`wait.vote`, `wait.stitch`, `wait.render`).

    Retries: Airflow 3.2-3.3 can fail a reschedule-mode sensor when the executor's report of one poke
    arrives after the next poke was queued (apache/airflow#71172, "finished with state success, but the
    task instance's state attribute is queued"); a retry simply pokes again.
    """
    poke = _seconds(WAIT_POKE_ENV, 60.0)
    kwargs.setdefault("retries", 3)
    kwargs.setdefault("retry_delay", timedelta(seconds=poke))
    return EarlierBlocksSensor(
        task_id=f"wait.{kind}", task_display_name=f"wait for earlier blocks: {kind}", runs=runs, kind=kind,
        mode="reschedule", poke_interval=poke, timeout=timedelta(seconds=_seconds(WAIT_TIMEOUT_ENV, 24 * 3600.0)),
        **kwargs)
