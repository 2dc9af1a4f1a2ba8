"""A writer killed with SIGKILL never leaves a torn chunk on file:// layers.

How: a small "zygote" process imports seamless_core once and forks one writer per round (so a round
costs milliseconds, not an interpreter start). Each writer overwrites a 2048x2048 float32 field layer
(4 chunks of 1024x1024x2 = 8 MiB each, uncompressed) again and again with constant values that no
earlier round used, and is SIGKILLed after a random delay. After every kill a fresh `open_layer` +
`Layer.read` must decode every chunk to one constant value (old or new, never a mix, never a decode
error), every completed write must still be there, and no chunk may go back to an older value.

The same harness run against a naive writer (a plain CloudVolume, which cloud-files writes in place
with open(path, 'wb')) shows what the staging + os.replace scheme prevents: truncated or mixed chunks.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from seamless_core.errors import SeamlessError
from seamless_core.geometry import BBox
from seamless_core.volumes import Layer, LayerKind, create_from_info, make_image_info, open_layer

REPO = Path(__file__).resolve().parents[1]
SIDE, CHUNK = 2048, 1024
CHUNK_BYTES = CHUNK * CHUNK * 2 * 4  # raw float32, 2 channels: the exact size of a whole chunk file
MIN_KILLS, MAX_KILLS, TIME_BUDGET_S = 20, 40, 15.0
MAX_DELAY_S = 0.25  # a few writes long: kills land before, inside and between writes
PROGRESS_EVERY = 4  # every 4th round waits for one completed write before its kill (MIN_KILLS / 4 >= 5)

ZYGOTE = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from cloudvolume import CloudVolume
    from seamless_core.volumes import LayerKind, open_layer

    path = sys.argv[1]

    def say(*words):  # one write(2) per line: lines of the zygote and its writer never interleave
        os.write(1, (" ".join(str(w) for w in words) + "\\n").encode())

    def write_forever(mode, base):
        layer = open_layer(path, LayerKind.FIELD)
        bbox = layer.bounds(0)
        shape = (bbox.size[2], 2, bbox.size[1], bbox.size[0])
        if mode == "naive":  # cloud-files writes each chunk file in place: open(path, "wb").write(...)
            cv = CloudVolume(path, mip=0, progress=False, non_aligned_writes=False,
                             delete_black_uploads=False, compress=False, fill_missing=False)
        say("ready")
        value = base
        while True:
            data = np.full(shape, value, np.float32)
            if mode == "atomic":
                layer.write(bbox, data)
            else:
                cv[bbox.to_slices()] = data.transpose(3, 2, 0, 1)
            say("done", value)
            value += 1

    for line in sys.stdin:
        mode, base = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                write_forever(mode, int(base))
            except BaseException as exc:
                say("error", repr(exc).replace(chr(10), " "))
            os._exit(1)
        say("pid", pid)
        os.waitpid(pid, 0)
        say("reaped")
    """
)


class Zygote:
    """The forking helper process and a thread that turns its stdout into a queue of lines."""

    def __init__(self, script: Path, layer_path: str) -> None:
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, str(script), layer_path], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=dict(os.environ, PYTHONPATH=python_path), cwd=REPO)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put("eof")

    def expect(self, tag: str, done: list[int], timeout: float = 20.0) -> str:
        """Wait for a line starting with `tag`, collecting 'done <value>' lines on the way."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {tag!r} from the writer within {timeout} s") from None
            if line.startswith("done "):
                done.append(int(line.split()[1]))
                if tag == "done":
                    return line
            elif line.startswith(tag):
                return line
            elif line.startswith(("error", "eof")):
                stderr = self.process.stderr.read() if line == "eof" and self.process.stderr else ""
                raise AssertionError(f"writer failed before it was killed: {line} {stderr}")

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class KillReport:
    kills: int = 0
    seconds: float = 0.0
    torn: list[str] = field(default_factory=list)  # what each torn observation looked like
    interrupted: int = 0  # rounds whose kill left staging debris or chunks of two different writes
    mixed: int = 0  # rounds whose kill fell between two chunk renames: chunks of two writes, each whole
    writes_done: int = 0


def _chunk_boxes() -> list[BBox]:
    corners = [(x, y) for y in range(0, SIDE, CHUNK) for x in range(0, SIDE, CHUNK)]
    return [BBox((x, y, 0), (x + CHUNK, y + CHUNK, 1)) for x, y in corners]


def _make_layer(root: Path) -> Layer:
    info = make_image_info(dtype="float32", resolution=(4, 4, 40), size=(SIDE, SIDE, 1), chunk_xy=CHUNK,
                           kind=LayerKind.FIELD)
    layer = create_from_info(str(root / "field"), info, LayerKind.FIELD)
    assert layer.seamless_info["compress"] is False  # raw chunk files: their exact size is known
    layer.write(layer.bounds(0), np.full((1, 2, SIDE, SIDE), 1.0, np.float32))
    return layer


def _inspect(layer_path: str, chunk_dir: Path) -> tuple[dict[BBox, float] | None, list[str]]:
    """Each chunk's single value, read through a fresh open_layer + Layer.read; or what is torn."""
    sizes = {p.name: p.stat().st_size for p in chunk_dir.iterdir()}
    problems = [f"{name}: {size} bytes" for name, size in sizes.items() if size != CHUNK_BYTES]
    names = sorted(p.name for p in chunk_dir.iterdir())
    if len(names) != 4:
        problems.append(f"chunk folder holds {names}")
    try:
        layer = open_layer(layer_path, LayerKind.FIELD)
        data = layer.read(layer.bounds(0))
    except (SeamlessError, ValueError, OSError) as exc:  # cloud-volume's decode errors are ValueErrors
        return None, [*problems, f"read failed: {type(exc).__name__}: {str(exc)[:200]}"]
    values = {}
    for box in _chunk_boxes():
        tile = data[0, :, box.start[1] : box.stop[1], box.start[0] : box.stop[0]]
        lo, hi = float(tile.min()), float(tile.max())
        if lo != hi:
            problems.append(f"chunk {box} mixes values {lo} and {hi}")
        values[box] = hi
    return (None if problems else values), problems


def _kill_writers(tmp_path: Path, mode: str) -> KillReport:
    """Fork writers of `mode`, SIGKILL each at a random moment, inspect the layer after every kill.

    Stops at the first torn chunk (recorded in the report), else after MAX_KILLS kills or the time budget.
    """
    layer = _make_layer(tmp_path)
    chunk_dir = tmp_path / "field" / layer.scale(0)["key"]
    staging = tmp_path / "field" / ".staging"
    script = tmp_path / "zygote.py"
    script.write_text(ZYGOTE)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    report = KillReport()
    previous = {box: 1.0 for box in _chunk_boxes()}
    zygote = Zygote(script, layer.path)
    start = time.monotonic()
    try:
        def more() -> bool:
            return report.kills < MIN_KILLS or time.monotonic() - start < TIME_BUDGET_S

        while report.kills < MAX_KILLS and more():
            base = (report.kills + 1) * 100_000  # values no other round writes, exact in float32
            done: list[int] = []
            assert zygote.process.stdin is not None
            zygote.process.stdin.write(f"{mode} {base}\n")
            zygote.process.stdin.flush()
            pid = int(zygote.expect("pid", done).split()[1])
            zygote.expect("ready", done)
            if report.kills % PROGRESS_EVERY == 0:  # on a loaded machine one write can outlast MAX_DELAY_S:
                zygote.expect("done", done, timeout=60.0)  # let every few rounds finish one, so writes land
            time.sleep(rng.uniform(0.0, MAX_DELAY_S))
            os.kill(pid, signal.SIGKILL)
            zygote.expect("reaped", done)
            report.kills += 1
            report.writes_done += len(done)

            values, problems = _inspect(layer.path, chunk_dir)
            debris = staging.exists() and any(staging.iterdir())
            if values is None:
                report.torn.append(f"kill {report.kills}: " + "; ".join(problems))
                break
            # old or new, never older than before, never losing a completed write, never from the future
            floor = max(done) if done else None
            newest = (base - 1 if floor is None else floor) + 2  # one write done unreported, the next begun
            for box, value in values.items():
                where = f"kill {report.kills}: chunk {box}"
                assert value >= previous[box], f"{where} went back from {previous[box]} to {value}"
                assert floor is None or value >= floor, f"{where} lost the completed write {floor} ({value})"
                assert value == previous[box] or base <= value <= newest, f"{where} holds unwritten {value}"
            if debris or len(set(values.values())) > 1:
                report.interrupted += 1
            report.mixed += len(set(values.values())) > 1
            previous = values
            if report.kills % 8 == 0:  # bound the debris on disk (up to 32 MiB a kill); reads passed it above
                shutil.rmtree(staging, ignore_errors=True)
    finally:
        zygote.close()
        report.seconds = time.monotonic() - start
    return report


def test_killed_atomic_writer_never_leaves_a_torn_chunk(tmp_path: Path) -> None:
    report = _kill_writers(tmp_path, "atomic")
    assert not report.torn, report.torn
    assert report.kills >= MIN_KILLS
    # the kills really landed inside writes (not only between them), and writers made progress
    assert report.interrupted >= 3, report
    assert report.writes_done >= MIN_KILLS // PROGRESS_EVERY, report
    print(f"atomic: {report.kills} kills in {report.seconds:.1f} s, {report.writes_done} completed writes, "
          f"{report.interrupted} kills inside a write ({report.mixed} between chunk renames), 0 torn chunks")


@pytest.mark.xfail(
    strict=False,
    reason="demonstration, not a guarantee: a random SIGKILL must land inside cloud-files' in-place "
    "open('wb') + write() of a chunk to tear it; usually several of the kills do",
)
def test_naive_in_place_writer_does_tear_chunks(tmp_path: Path) -> None:
    """The control: the same harness catches torn chunks when CloudVolume writes files in place."""
    report = _kill_writers(tmp_path, "naive")
    print(f"naive: torn after {report.kills} kills: {report.torn[:1]}")
    assert report.torn, f"no torn chunk in {report.kills} kills"


def test_staging_debris_never_breaks_reads_or_other_writers(tmp_path: Path) -> None:
    """Debris of killed writers (partial chunk files under .staging) is invisible to readers and writers."""
    layer = _make_layer(tmp_path)
    key = layer.scale(0)["key"]
    root = tmp_path / "field"
    foreign = root / ".staging" / "0123456789abcdef" / key
    foreign.mkdir(parents=True)
    for box in _chunk_boxes():  # same names as the real chunks, torn: half written, or empty
        name = f"{box.start[0]}-{box.stop[0]}_{box.start[1]}-{box.stop[1]}_0-1"
        (foreign / name).write_bytes(b"\x00" * (CHUNK_BYTES // 2 if box.start[0] else 0))
    (root / ".staging" / "not-a-folder").write_bytes(b"junk")
    (root / ".staging" / "empty").mkdir()

    values, problems = _inspect(layer.path, root / key)
    assert values is not None and set(values.values()) == {1.0}, problems

    reopened = open_layer(layer.path, LayerKind.FIELD)
    reopened.write(reopened.bounds(0), np.full((1, 2, SIDE, SIDE), 2.0, np.float32))
    values, problems = _inspect(layer.path, root / key)
    assert values is not None and set(values.values()) == {2.0}, problems
    # a writer cleans up only its own staging folder: another writer's in-flight files are left alone
    assert sorted(p.name for p in foreign.iterdir()) == sorted(
        f"{b.start[0]}-{b.stop[0]}_{b.start[1]}-{b.stop[1]}_0-1" for b in _chunk_boxes()
    )
    left = sorted(p.name for p in (root / ".staging").iterdir())
    assert left == ["0123456789abcdef", "empty", "not-a-folder"]


@pytest.fixture(autouse=True)
def _no_stray_writers() -> Iterator[None]:
    """Every zygote is closed in a finally; this only makes a leak visible as a failure."""
    before = set(_children())
    yield
    leaked = set(_children()) - before
    assert not leaked, f"writer processes left running: {leaked}"


def _children() -> list[int]:
    path = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []
