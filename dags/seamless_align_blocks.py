"""The `seamless_align_blocks` DAG: section-range backfills, one run per block of sections.

Built from the same project YAML and plan as `seamless_align` (env SEAMLESS_PROJECT, default
dags/seamless_project.example.yaml). Its timetable (operators/section_timetable.py) gives block b the
partition date 2000-01-01 + b days and the partition key `sections 11-20 (block 1)`; it never schedules
runs itself: a backfill over a date range (UI dialog or `airflow backfill create`; `seamless backfill
PROJECT --z A:B` translates sections to dates) creates one run per block. Every run has the same tasks,
one per position in a block (`p3.vote` = vote of section s_b + 3, shown as `z=s+3 mip=0 vote`), resolved
to the run's block when they run; the `wait.*` sensors hold the steps that need earlier blocks (the stitch,
the composes, the first CPC) until those blocks' restart markers are current. docs/backfill.md.

The timetable is a custom one: Airflow serializes it only with plugins/ loaded (AIRFLOW__CORE__PLUGINS_FOLDER).
When Airflow parses this folder for another DAG (`airflow dags test seamless_align`, a task of
seamless_align), this file builds nothing, so that DAG never depends on the plugin.
"""

from __future__ import annotations

import os
from pathlib import Path

from airflow.sdk import DAG, TaskGroup, get_parsing_context

DAG_ID = "seamless_align_blocks"
DEFAULT_PROJECT = Path(__file__).with_name("seamless_project.example.yaml")
GROUPS = {"block_start": "chain", "compute_field": "chain", "vote": "chain", "block_render": "chain",
          "compose": "compose", "render": "render", "cpc": "quality", "cpc_source": "quality"}  # stitch: alone
SHOWN_BLOCKS = 12  # blocks listed in the DAG's docs (the mapping of the rest follows the same rule)


def build(project: Path) -> DAG:
    """The DAG for a project YAML: one task per block template, the wait sensors, the plan's dependencies."""
    from operators.block_tasks import template_task, wait_task
    from operators.local import executor
    from operators.section_timetable import SectionBlockTimetable
    from seamless_core.block_runs import EPOCH, BlockRuns, load_project
    from seamless_core.plan import build_plan

    config = load_project(project)  # validation only: no storage is touched, torch not imported
    runs = BlockRuns(build_plan(config))
    templates = runs.templates()
    table = "\n".join(f"| {r.index} | {r.date.date()} | `{r.key}` |" for r in runs.runs[:SHOWN_BLOCKS])
    more = f"\n\n… {len(runs.runs) - SHOWN_BLOCKS} more blocks, one day each." if len(runs.runs) > SHOWN_BLOCKS else ""
    kind = executor()
    with DAG(
        dag_id=DAG_ID,
        dag_display_name="SEAMLeSS align: section-range backfills",
        description=f"one run per block of sections {config.sections.start}:{config.sections.stop} of {config.source}",
        schedule=SectionBlockTimetable([r.key for r in runs.runs]),
        start_date=EPOCH,
        catchup=False,
        is_paused_upon_creation=False,  # it never schedules a run itself; backfills need it unpaused
        max_active_runs=16,  # backfills use their own max_active_runs; blocks write disjoint sections
        tags=["seamless", "backfill"],
        doc_md=__doc__ + f"\n\nProject: `{project}`; executor: `{kind}`; {len(runs.runs)} blocks, "
        f"{len(templates)} tasks per run.\n\n| block | partition date | partition key |\n|---|---|---|\n{table}{more}",
    ) as dag:
        groups: dict[str, TaskGroup] = {}

        def group(name: str | None) -> TaskGroup | None:
            if name is not None and name not in groups:
                groups[name] = TaskGroup(name, prefix_group_id=False, tooltip=name)
            return groups.get(name) if name else None

        tasks = {t.id: template_task(t, runs, kind=kind, task_group=group(GROUPS.get(t.kind))) for t in templates}
        top = 1 + max(t.priority for t in templates)  # sensors first: they hold the cross-block steps
        waits = {k: wait_task(k, runs, task_group=group("wait"), priority_weight=top, weight_rule="absolute")
                 for k in runs.wait_kinds()}
        for template in templates:
            for dep in sorted(template.deps):
                tasks[dep] >> tasks[template.id]
            for wanted in sorted(template.waits):
                waits[wanted] >> tasks[template.id]
    return dag


if get_parsing_context().dag_id in (None, DAG_ID):  # Airflow parses this folder for one DAG: not ours, skip
    dag = build(Path(os.environ.get("SEAMLESS_PROJECT") or DEFAULT_PROJECT).expanduser().resolve())
