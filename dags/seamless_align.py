"""The `seamless_align` DAG: one task per step of `seamless_core.plan` (section, MIP stage, step), or per
group of steps with the project's `fuse: section | block` (`Plan.tasks`: fewer task and pod starts).

Thin on purpose (docs/dags.md): the tasks come from the project YAML named by env SEAMLESS_PROJECT
(default: dags/seamless_project.example.yaml, the 30-section demo volume), read when the file is parsed;
no layer is opened here. Task id = step id, display name = step label ("z=12 mip=0 compute_field t1"),
dependencies = the plan's, priority_weight = the plan's priority (absolute). Which operator runs a step
(local subprocess or Kubernetes pod) is env SEAMLESS_EXECUTOR / Variable seamless_executor.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from airflow.sdk import DAG, Param, TaskGroup
from airflow.sdk.definitions.param import ParamsDict

from operators.local import PlanStepRef, executor, step_operator, structure_key
from seamless_core.config import parse_config
from seamless_core.estimators.spec import PRESETS
from seamless_core.plan import build_plan

DEFAULT_PROJECT = Path(__file__).with_name("seamless_project.example.yaml")
PROJECT = Path(os.environ.get("SEAMLESS_PROJECT") or DEFAULT_PROJECT).expanduser().resolve()
GROUPS = {"stitch": "stitch", "compose": "compose", "render": "render", "downsample": "render",
          "cpc": "quality", "cpc_source": "quality",
          "final": "render"}  # anything else with a block (a fused `chain` too): that block's serial chain


def _local(path: str | None, root: Path) -> str | None:
    """Relative local paths in the project file are relative to the file, not to the parser's cwd."""
    if path is None or "://" in path or os.path.isabs(path):
        return path
    return str((root / path).resolve())


with open(PROJECT, encoding="utf-8") as fh:
    _raw = yaml.safe_load(fh)
if isinstance(_raw, dict):
    for _key in ("source", "destination", "mask"):
        if _raw.get(_key):
            _raw[_key] = _local(_raw[_key], PROJECT.parent)
config = parse_config(_raw, str(PROJECT))  # validation only: no storage is touched, torch not imported
base = config.model_dump(mode="json")
plan = build_plan(config)
structure = structure_key(plan)
priorities = plan.task_priorities()  # = plan.priorities() with fuse: none (a task per step)
stages = config.stages if isinstance(config.stages, str) else "project"

params = {
    "source": Param(config.source, type="string", title="Source layer",
                    description="image layer to align (file://, gs://, s3://)"),
    "destination": Param(config.destination, type="string", title="Destination",
                         description="folder receiving every layer of the run (docs/layout.md)"),
    "section_start": Param(config.sections.start, type="integer", minimum=0, title="First section",
                           description="fixed by the project YAML (it shapes the tasks); another value is refused"),
    "section_stop": Param(config.sections.stop, type="integer", minimum=1, title="Stop section (exclusive)",
                          description="fixed by the project YAML (it shapes the tasks); another value is refused"),
    "stages": Param(stages, type="string", enum=sorted({*PRESETS, stages}), title="Stage preset",
                    description="estimator stages (docs/estimators.md); 'project' = the list in the project YAML. "
                                "A preset with other MIPs changes the tasks and is refused"),
    "block_size": Param(config.blocks.size, type="integer", minimum=2, title="Block size",
                        description="sections per parallel block; fixed by the project YAML"),
    "k": Param(config.vote.k, type="integer", minimum=1, maximum=15, title="Vote targets k",
               description="odd number of earlier sections voting on each field; fixed by the project YAML"),
    "decay_dist": Param(config.blocks.decay_dist, type="integer", minimum=1, title="Stitch decay distance",
                        description="sections over which a stitch correction fades; fixed by the project YAML"),
    "chunk": Param(config.chunk, type=["null", "integer"], minimum=1, title="Field chunk (px)",
                   description="processing chunk edge of field steps; empty = the storage chunk"),
    "fuse": Param(config.fuse, type="string", enum=["none", "pairs", "section", "block"], title="Fuse steps into tasks",
                  description="none: a task per step; pairs: a vote with its block render, a compose with its render, "
                              "a block's CPCs; section / block: a section's (block's) chain and final steps as one task "
                              "each (docs/dags.md); fixed by the project YAML (it shapes the tasks)"),
    "device": Param(config.device, type="string", pattern="^(cpu|cuda(:[0-9]+)?|auto)$", title="Device",
                    description="cpu, cuda, cuda:N or auto"),
}

with DAG(
    dag_id="seamless_align",
    dag_display_name="SEAMLeSS align",
    description=f"align sections {config.sections.start}:{config.sections.stop} of {config.source}",
    schedule=None,
    catchup=False,
    max_active_runs=1,  # two runs would write the same destination
    tags=["seamless"],
    doc_md=__doc__ + f"\n\nProject: `{PROJECT}`; executor: `{executor()}`; {len(plan.steps)} steps in {len(plan.tasks)} tasks (fuse: {config.fuse}).",
) as dag:
    ref_args = (base, str(PROJECT))
    groups: dict[str, TaskGroup] = {}

    def group(step) -> TaskGroup:
        name = GROUPS.get(step.kind) or (f"block_{step.block:03d}" if step.block is not None else "other")
        if name not in groups:
            groups[name] = TaskGroup(name, prefix_group_id=False, tooltip=name.replace("_", " "))
        return groups[name]

    kind = executor()
    tasks = {}
    for step in plan.tasks:  # one step each, or several fused (`fuse`)
        task = step_operator(step, plan, kind=kind, priorities=priorities, task_group=group(step),
                             plan_ref=PlanStepRef(*ref_args, step.id, structure))
        if step.deps:  # what set_upstream does, without its per-call checks (all tasks share this DAG)
            task.upstream_task_ids.update(step.deps)
            for dep in step.deps:
                tasks[dep].downstream_task_ids.add(step.id)
        tasks[step.id] = task
    # The run's Params form. Set after the tasks are made: BaseOperator deep-copies the DAG's params into
    # every task it creates (seconds for 10,000 tasks, and a serialized DAG 10,000 times larger); a task's
    # context still gets them (process_params merges dag.params, then the run's conf).
    dag.params = ParamsDict(params)
