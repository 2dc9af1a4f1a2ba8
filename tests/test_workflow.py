"""The whole workflow end to end on real layers: vote, blocks, stitching, compose, final render, report.

Plumbing is measured exactly: every section is an independently deformed copy of one real section
(section 0 untouched), so each final field must equal the known inverse deformation. Any error is the
pipeline's own. One section carries a 5 px crack and one a debris patch, inside blocks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from seamless_core.cli import main
from seamless_core.config import load_config
from seamless_core.errors import ExitCode
from seamless_core.geometry import BBox
from seamless_core.plan import build_plan
from seamless_core.volumes import LayerKind, open_layer

from workflow_helpers import DeformedStack, deformed_stack, endpoint_errors

SIZE, SECTIONS = 256, 13
PROJECT = """\
source: {source}
destination: {destination}
sections: {{start: 0, stop: {stop}}}
stages: exact
blocks: {{size: 4, decay_dist: 1000}}
vote: {{k: 3}}
chunk: 128
cpc: {{mip: 1, patch: 16}}
"""


def write_project(root: Path, source: Path, name: str, stop: int = SECTIONS, extra: str = "") -> Path:
    path = root / f"{name}.yaml"
    path.write_text(PROJECT.format(source=source, destination=root / name, stop=stop) + extra)
    return path


@pytest.fixture(scope="module")
def plumbing(tmp_path_factory) -> tuple[DeformedStack, Path]:
    root = tmp_path_factory.mktemp("workflow")
    stack = deformed_stack(root, [0] * SECTIONS, SIZE, max_translation=8.0, cracked=(6,), debris=(9,))
    project = write_project(root, stack.path, "aligned")
    assert main(["align", str(project), "--workers", "2"]) == ExitCode.OK
    return stack, project


def test_every_section_lands_on_the_original(plumbing) -> None:
    stack, project = plumbing
    final = open_layer(str(project.parent / "aligned" / "fields" / "final"), LayerKind.FIELD)
    figures = {}
    for z in range(SECTIONS):
        estimate = final.read(BBox((0, 0, z), (SIZE, SIZE, z + 1)))
        figures[z] = endpoint_errors(estimate, stack, z, margin=24)
    print("final field end-point error (median, p95) px per section:", json.dumps(figures))
    assert all(median <= 0.2 and p95 <= 1.0 for median, p95 in figures.values()), figures
    # the rendered image agrees with the original where the tissue survives (section 0 is a copy)
    image = open_layer(str(project.parent / "aligned" / "image"), LayerKind.IMAGE)
    aligned = image.read(BBox((0, 0, 0), (SIZE, SIZE, SECTIONS))).astype(np.float32)
    original = stack.originals[0][0, 0].numpy() * 255
    inner = (slice(24, -24), slice(24, -24))
    assert np.array_equal(aligned[0, 0], np.round(original))
    for z in (5, 10):  # one per later block, through one and two stitches
        keep = stack.tissue[z][0, 0].numpy()[inner] & ~stack.crack_band[z][0, 0].numpy()[inner]
        assert np.median(np.abs(aligned[z, 0][inner] - original[inner])[keep]) < 6  # grey levels of 255


def test_outputs_follow_the_documented_layout(plumbing) -> None:
    _, project = plumbing
    out = project.parent / "aligned"
    for name in ("image", "cpc", "cpc_source", "blocks/even", "blocks/odd", "fields/target_1", "fields/target_3",
                 "fields/voted", "fields/agreement", "fields/stitch", "fields/final"):
        assert (out / name / "info").is_file(), name
    assert (out / "report" / "index.html").is_file()
    summary = json.loads((out / "cpc" / "summary" / "5.json").read_text())
    before = json.loads((out / "cpc_source" / "summary" / "5.json").read_text())
    assert summary["median"] > before["median"] + 0.1  # aligned neighbours correlate far better


def test_a_rerun_skips_every_finished_step(plumbing, capsys) -> None:
    _, project = plumbing
    steps = len(build_plan(load_config(project)).steps)
    started = time.monotonic()
    assert main(["align", str(project), "--workers", "2", "--no-report"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert f"steps run: 0, skipped (already done): {steps}," in out
    print(f"rerun of {steps} finished steps: {time.monotonic() - started:.1f} s")


def test_kill_9_midway_then_rerun_finishes_identically_without_redoing_steps(plumbing, tmp_path) -> None:
    stack, reference = plumbing
    project = write_project(tmp_path, stack.path, "killed")
    markers = tmp_path / "killed" / ".seamless" / "steps"
    command = [sys.executable, "-m", "seamless_core", "align", str(project), "--workers", "2", "--no-report"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = len(build_plan(load_config(project)).steps)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(markers.glob("*.json"))) < total // 3:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the executor and its workers, mid-step, like a lost machine
    process.wait()
    finished = {p.stem: json.loads(p.read_text())["run_id"] for p in markers.glob("*.json")}
    assert 0 < len(finished) < total
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("steps run:"))
    print(f"killed after {len(finished)} of {total} steps; rerun: {line}")
    assert f"skipped (already done): {len(finished)}," in line
    assert f"steps run: {total - len(finished)}," in line
    for step_id, run_id in finished.items():  # no finished step was redone
        assert json.loads((markers / f"{step_id}.json").read_text())["run_id"] == run_id
    region = BBox((0, 0, 0), (SIZE, SIZE, SECTIONS))
    killed = open_layer(str(tmp_path / "killed" / "image"), LayerKind.IMAGE).read(region)
    clean = open_layer(str(reference.parent / "aligned" / "image"), LayerKind.IMAGE).read(region)
    assert np.array_equal(killed, clean)


def test_bad_projects_are_refused_before_anything_is_written(plumbing, tmp_path, capsys) -> None:
    stack, _ = plumbing
    cases = {
        "outside": ("sections: {start: 0, stop: 40}\n", "lie outside the source's sections 0:13"),
        "mip": ("stages: [{mip: 5, estimators: [{name: block_matching}]}]\n", "has no MIP [5]"),
    }
    for name, (line, message) in cases.items():
        text = PROJECT.format(source=stack.path, destination=tmp_path / name, stop=SECTIONS)
        text = "\n".join(l for l in text.splitlines() if not (l.startswith("sections") and "sections" in line)) + "\n" + line
        (tmp_path / f"{name}.yaml").write_text(text)
        assert main(["align", str(tmp_path / f"{name}.yaml")]) == ExitCode.INVALID_INPUT
        assert message in capsys.readouterr().err
        assert not (tmp_path / name).exists()
    (tmp_path / "typo.yaml").write_text(PROJECT.format(source=stack.path, destination=tmp_path / "t", stop=5) + "blok_size: 3\n")
    assert main(["plan", str(tmp_path / "typo.yaml")]) == ExitCode.INVALID_INPUT
    assert "blok_size: unknown key" in capsys.readouterr().err


def test_init_writes_a_config_that_plans(plumbing, tmp_path, capsys) -> None:
    stack, _ = plumbing
    out = tmp_path / "project.yaml"
    assert main(["init", "--src", str(stack.path), "--dst", str(tmp_path / "out"), "--out", str(out)]) == ExitCode.OK
    assert main(["plan", str(out)]) == ExitCode.OK
    assert "block 1: sections 10..12" in capsys.readouterr().out
    assert load_config(out).stages == "serial"  # real neighbours: the exact stages would morph them
    assert main(["init", "--src", str(stack.path), "--dst", str(tmp_path / "out"), "--out", str(out)]) == ExitCode.INVALID_INPUT


def test_a_second_run_into_the_same_destination_is_refused_while_one_runs(plumbing, tmp_path) -> None:
    stack, _ = plumbing
    first = write_project(tmp_path, stack.path, "shared")
    overlapping = tmp_path / "overlap.yaml"  # another section range, same destination
    overlapping.write_text(PROJECT.format(source=stack.path, destination=tmp_path / "shared", stop=6))
    lock = tmp_path / "shared" / ".seamless" / "lock"
    command = [sys.executable, "-m", "seamless_core", "align", str(first), "--workers", "1", "--no-report"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (lock.exists() and lock.read_text()):
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "seamless_core", "align", str(overlapping), "--no-report"],
                                capture_output=True, text=True, timeout=120)
        assert process.poll() is None, "the first run ended before the second tried"
        assert second.returncode == ExitCode.INVALID_INPUT, second.stderr[-2000:]
        assert "another `seamless align` is writing into" in second.stderr and f'"pid": {process.pid}' in second.stderr
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # the kernel released the dead holder's lock: a rerun is not blocked by a stale file
    assert main(["plan", str(overlapping)]) == ExitCode.OK
    from seamless_core.executor import destination_lock

    with destination_lock(build_plan(load_config(overlapping))):
        pass
