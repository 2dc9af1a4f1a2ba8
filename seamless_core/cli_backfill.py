"""`seamless backfill PROJECT --z A:B`: a section range as an Airflow backfill of `seamless_align_blocks`.

Airflow owns the runs; this only translates sections into the partition dates of the blocks that output
them (seamless_core.block_runs: block b = 2000-01-01 + b days), prints the `airflow backfill create`
command line and runs it (`--print-only`: print it and stop). No Airflow import: it runs the `airflow`
command of the current environment (AIRFLOW_HOME etc. as the caller set them).

Registered as `seamless backfill` by seamless_core.cli (which imports this module at its end);
`python -m seamless_core.cli_backfill PROJECT --z A:B` runs the same command.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from .cli import app, parse_z
from .errors import InputError

DAG_ID = "seamless_align_blocks"


@app.command()
def backfill(
    project: Annotated[Path | None, typer.Argument(help="Project YAML the DAG was built from (default: env SEAMLESS_PROJECT).")] = None,
    z: Annotated[str, typer.Option("--z", help="Sections A:B (B excluded); every block that outputs one of them is run.")] = "",
    reprocess: Annotated[str, typer.Option("--reprocess", help="Blocks that already have a run: none (skip), failed (redo failed ones), completed (redo all).")] = "none",
    max_active_runs: Annotated[int | None, typer.Option("--max-active-runs", min=1, help="Blocks running at once (Airflow's default: 10).")] = None,
    dag_id: Annotated[str, typer.Option("--dag-id", help="The per-block DAG.")] = DAG_ID,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Ask Airflow which runs it would create; create none.")] = False,
    print_only: Annotated[bool, typer.Option("--print-only", help="Print the airflow command instead of running it.")] = False,
) -> None:
    """Backfill sections A:B through Airflow: one run of the per-block DAG per block of sections."""
    from .block_runs import BlockRuns, backfill_command, load_project
    from .plan import build_plan

    path = project or (Path(os.environ["SEAMLESS_PROJECT"]) if os.environ.get("SEAMLESS_PROJECT") else None)
    if path is None:
        raise InputError("name the project YAML the DAG was built from (argument PROJECT or env SEAMLESS_PROJECT)")
    if not z:
        raise InputError("--z A:B is required: the sections to backfill, e.g. --z 100:200")
    start, stop = parse_z(z)
    runs = BlockRuns(build_plan(load_project(path)))
    chosen = runs.for_range(start, stop)
    argv = backfill_command(chosen, dag_id=dag_id, reprocess=reprocess, max_active_runs=max_active_runs,
                            dry_run=dry_run)
    typer.echo(f"sections {start}:{stop} -> {len(chosen)} block run(s), sections {chosen[0].first}..{chosen[-1].last}:")
    for run in chosen:
        typer.echo(f"  {run.date.date()}  {run.key}")
    _note_earlier_blocks(runs, chosen[0].index)
    typer.echo(shlex.join(argv))
    if print_only:
        return
    try:
        result = subprocess.run(argv, check=False)
    except FileNotFoundError:
        raise InputError("the `airflow` command is not on PATH: run this where Airflow is installed "
                         "(with the same AIRFLOW_HOME as the scheduler), or use --print-only") from None
    if result.returncode != 0:
        raise typer.Exit(result.returncode)


def _note_earlier_blocks(runs, first: int) -> None:  # type: ignore[no-untyped-def]
    """A range that starts after block 0 waits for earlier blocks' steps: say so if they are not done."""
    if first == 0:
        return
    try:
        from .markers import MarkedStep
    except ImportError:  # the scheduler image may lack the storage libraries: no check, no harm
        return
    layout, missing = runs.plan.layout, []
    for step in runs.external(first):
        marked = MarkedStep(layout.marker(step.id), tuple(layout.marker(d) for d in step.deps), step.args)
        try:
            done = marked.is_done()
        except Exception:  # noqa: BLE001 - unreadable or upstream missing: not done
            done = False
        if not done:
            missing.append(step.id)
    if missing:
        typer.echo(f"note: block {first} waits for steps of earlier blocks that are not done yet ({', '.join(missing)});"
                   f" its wait.* tasks hold until they are (backfill from an earlier section, or run them)", err=True)


if __name__ == "__main__":
    from .cli import run_command

    sys.exit(run_command(["backfill", *sys.argv[1:]])[0])
