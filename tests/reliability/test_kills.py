"""Point 1 of issue #7: steps SIGKILLed at random points, like preempted pods, then rerun.

Every compute_field, vote, block render, compose and final render step of the small project is killed
up to six times (until a kill comes too late: the step had finished) while it sets up, writes an info
file, reads, computes, writes chunks or writes its restart marker, then rerun to the end. After every kill,
every chunk of every layer of the destination must be whole and decodable; after the rerun the step's
marker must say it is done and a further rerun must skip it with its run id unchanged; at the end every
output file must be byte-identical to the clean run's and no finished step may have been redone.

How a kill is placed: the clean run traced each step's chunk reads and writes, info and marker writes
(reliability/harness.py); kill k of a step picks a phase (PER_STEP, in turn), one stretch of the clean
trace in that phase (weighted by its length) and a random delay inside it, and the fork server SIGKILLs
the child that long after the stretch's opening event. Where the kill really landed is read from the
killed run's own trace and counted. A phase whose landed kills lag behind its share of AT_LEAST gets up to
TOP_UP more kills aimed at it per step (a loaded machine pushes kills aimed at short reads into the
compute after them). RELIABILITY_SEED=N replays a run's choices (on the same machine load).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path

from .conftest import CleanRun
from .harness import Kill, Outcome, Zygote
from .layers import decode_everything, layer_folders, output_files, staging_debris, torn_chunks
from .projects import outputs_of, plan_of, write_project

KILLED_KINDS = ("compute_field", "vote", "block_render", "compose", "render")
KILLS = 100
# phases aimed at, in order, per step. "info" first: only a step's first run creates its layers (and only
# steps that create one have an info write; the others take another phase)
PER_STEP = ("info", "setup", "read", "compute", "write", "marker")
TARGETS = ("setup", "info", "read", "compute", "write", "marker")
AT_LEAST = {"read": 10, "compute": 10, "write": 10, "info": 5, "marker": 10}  # kills that must land in each
TOP_UP = 2  # extra kills per step at most, aimed at the phases that are behind (see `behind`)


def behind(phases: Counter[str], done: float) -> list[str]:
    """The phases whose landed kills lag their share of AT_LEAST after `done` (0..1) of the steps, most behind
    first. A kill aimed at a short stretch (a read of one chunk) often lands in the next phase when the
    machine is loaded, so these get extra kills instead of the count depending on the machine's load."""
    lag = {phase: least * done - phases[phase] for phase, least in AT_LEAST.items() if phase != "info"}
    return sorted((phase for phase, amount in lag.items() if amount > 0), key=lambda phase: -lag[phase])


def choose_kill(clean: Outcome, target: str, rng: random.Random) -> Kill:
    """A kill inside a stretch of the clean run that is in phase `target`, at a random point of it."""
    if target == "setup":
        return Kill("", 1, rng.uniform(0.0, clean.setup_seconds))
    spans = [(kill, length) for kill, length, phase in clean.stretches() if phase == target and length > 0]
    if not spans:  # e.g. a compose that reads nothing before it writes
        spans = [(kill, length) for kill, length, phase in clean.stretches() if phase in TARGETS and length > 0]
    kill, length = rng.choices(spans, weights=[max(length, 0.002) for _, length in spans])[0]
    return Kill(kill.after, kill.nth, rng.uniform(0.0, length))


def no_torn_chunk(args: tuple[str, ...]) -> int:
    """Every chunk file of the layers the killed step writes is whole, and they decode in full (the
    killed process wrote nothing else; the whole destination is checked again at the end)."""
    checked = 0
    for url in outputs_of(args):
        layer = Path(url.removeprefix("file://"))
        if (layer / "info").exists():  # else killed before it created the layer
            problems = torn_chunks(layer)
            assert not problems, f"torn chunk files in {layer}: {problems[:3]}"
            decode_everything(layer)
            checked += 1
    return checked


def read_marker(path: Path) -> dict | None:
    """The marker's JSON, None when absent; a torn marker fails the test, naming the file."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AssertionError(f"torn restart marker {path}: {exc}") from None


def test_a_hundred_sigkills_of_steps_leave_no_trace(clean_run: CleanRun, server: Zygote, tmp_path: Path) -> None:
    project = write_project(tmp_path, clean_run.source, "killed")
    plan = plan_of(project)
    destination = tmp_path / "killed"
    markers = destination / ".seamless" / "steps"
    logs = tmp_path / "logs"
    logs.mkdir()
    seed = int(os.environ.get("RELIABILITY_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    print(f"kill seed {seed} (replay: RELIABILITY_SEED={seed})")  # shown with any failure
    phases: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    run_ids: dict[str, str] = {}
    missed: Counter[str] = Counter()  # kills that came too late: the step had finished, by phase aimed at
    killable = sum(1 for step in plan.steps if step.kind in KILLED_KINDS)
    killed_steps = top_ups = 0
    checked_layers = 0
    started = time.monotonic()
    for index, step in enumerate(plan.steps):
        argv = plan.argv(step)
        log = logs / f"{step.id}.log"
        if step.kind in KILLED_KINDS:
            killed_steps += 1
            targets, extra_given = list(PER_STEP), False
            while targets:
                target = targets.pop(0)
                kill = choose_kill(clean_run.outcomes[step.id], target, rng)
                outcome = server.run_one(argv, log, kill=kill)
                if not outcome.killed:  # it finished before its kill time: nothing more to kill
                    assert outcome.code == 0, log.read_text()[-2000:]
                    missed[target] += 1
                    break
                phases[outcome.phase] += 1
                kinds[step.kind] += 1
                checked_layers += no_torn_chunk(step.args)
                read_marker(markers / f"{step.id}.json")
                if not targets and not extra_given:  # the phases that fell behind get one more kill aimed at them
                    extra_given = True
                    targets = behind(phases, killed_steps / killable)[:TOP_UP]
                    top_ups += len(targets)
        done_before = read_marker(markers / f"{step.id}.json")
        rerun = server.run_one(argv, log)
        assert rerun.code == 0, f"{step.id} failed on rerun: {log.read_text()[-2000:]}"
        assert rerun.skipped is (done_before is not None), f"{step.id}: marker {done_before} but skipped={rerun.skipped}"
        marker = read_marker(markers / f"{step.id}.json")
        assert marker is not None, f"{step.id} finished without writing its marker"
        run_ids[step.id] = marker["run_id"]
        again = server.run_one(argv, log)  # a finished step is never redone
        assert again.code == 0 and again.skipped is True, f"{step.id} ran again: {log.read_text()[-2000:]}"
        assert read_marker(markers / f"{step.id}.json")["run_id"] == run_ids[step.id]
    seconds = time.monotonic() - started

    kills = sum(phases.values())
    info_steps = sum(1 for step in plan.steps if step.kind in KILLED_KINDS
                     and any(tag == "I+" for tag, _ in clean_run.outcomes[step.id].events))
    assert kills >= KILLS, f"only {kills} kills landed (steps finished before kills aimed at {dict(missed)})"
    for phase, least in AT_LEAST.items():  # the kills really spread over the step's work
        least = min(least, info_steps) if phase == "info" else least  # one info kill per creating step at most
        assert phases[phase] >= least, f"too few kills in the {phase} phase: {dict(phases)} (seed {seed})"
    redone = [s for s, run_id in run_ids.items() if read_marker(markers / f"{s}.json")["run_id"] != run_id]
    assert not redone, f"finished steps were redone by later reruns: {redone}"
    for layer in layer_folders(destination):
        assert not torn_chunks(layer), layer
        decode_everything(layer)
    files = output_files(destination)
    assert sorted(files) == sorted(clean_run.files), set(files) ^ set(clean_run.files)
    different = [name for name in files if files[name] != clean_run.files[name]]
    assert not different, f"{len(different)} output files differ from the clean run: {different[:5]}"
    debris = staging_debris(destination)
    print(f"\nstep kills (seed {seed}): {kills} SIGKILLs survived in {seconds:.1f} s ({dict(kinds)}); landed in "
          f"{dict(phases)} (steps that create a layer: {info_steps}; {top_ups} kills aimed at phases that were behind); kills that came after the step had finished (aimed at): {dict(missed)}; {checked_layers} "
          f"layer checks after kills, 0 torn chunks; {len(files)} output files, "
          f"{sum(len(b) for b in files.values())} bytes, identical to the clean run (0 bytes lost); "
          f"{len(run_ids)} steps finished, none redone; staging debris left: {debris[0]} folders, {debris[1]} bytes")
