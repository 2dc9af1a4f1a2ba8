"""The "Neuroglancer" extra link of both step operators: the task's section, aligned image and source.

Airflow 3 computes an operator's own extra links on the worker when a task try ends (the task runner's
`finalize`) and stores each URL in XCom (key `_link_NeuroglancerLink`); the UI reads it from there. So
the link is built where the task's plan reference and the run's Params are at hand, from paths and
numbers only (no storage is opened): the project config with the run's Params laid over it (another
destination or source applies), the step's z and the project's bbox. Until a try has ended there is no
link to show.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink

from seamless_core.neuroglancer import section_link

if TYPE_CHECKING:
    from .local import PlanStepRef


class NeuroglancerLink(BaseOperatorLink):
    """Opens the step's section (z; centred on the project's bbox) of `<destination>/image` and the source."""

    name = "Neuroglancer"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        ref = getattr(operator, "plan_ref", None)
        if ref is None:  # a step operator built outside the seamless_align DAG: no plan, no layers
            return ""
        return step_link(ref, run_params(ti_key))


def run_params(ti: Any) -> dict[str, Any]:
    """The run's Params (the DAG's defaults and the trigger's conf, as the task saw them).

    At `finalize` Airflow passes the runtime task instance, whose template context holds them; a bare
    TaskInstanceKey has none, and the project YAML's values apply.
    """
    get_context = getattr(ti, "get_template_context", None)
    if get_context is None:
        return {}
    return dict(get_context().get("params") or {})


def step_link(ref: PlanStepRef, params: dict[str, Any]) -> str:
    """The link for one plan step under a run's Params; "" when those Params no longer have the step."""
    from seamless_core.errors import InputError

    from .local import _plan_for, apply_params  # lazy: operators.local imports this module

    config = apply_params(ref.base, params)
    try:  # the same cache key as PlanStepRef.argv: the plan the task ran with is reused, not rebuilt
        plan = _plan_for(json.dumps(config, sort_keys=True), f"{ref.origin} with this run's Params")
    except InputError:  # invalid Params: the task itself failed with parse_config's message
        return ""
    step = plan.by_id.get(ref.step_id) or plan.task_by_id.get(ref.step_id)  # a step, or steps fused into a task
    if step is None or step.z is None:
        return ""
    layers = [("aligned", plan.layout.image), ("source", plan.config.source)]
    return section_link(layers, step.z, bbox=plan.config.bbox)
