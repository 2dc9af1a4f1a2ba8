"""`seamless report`: the HTML quality report over real layers, real CPC and the real sample sections."""

from __future__ import annotations

import json
import shutil
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seamless_core.cli import main
from seamless_core.errors import ExitCode
from seamless_core.neuroglancer import VIEWER
from seamless_core.report import build_report
from seamless_core.steps.cpc import CpcParams, cpc, prepare_cpc
from seamless_core.volumes import LayerKind, open_layer

from conftest import sample_section
from test_steps import make_layer

SIZE = 256
# (x, y) shift of each section: the source stack is misaligned by tens of pixels, the "aligned" stack is
# exact except for a small residual jump between sections 1 and 2, so section 2 must come out worst.
SOURCE_SHIFTS = [(0, 0), (20, -12), (-16, 10), (12, 18)]
ALIGNED_SHIFTS = [(0, 0), (0, 0), (6, -5), (6, -5)]


def shifted_stack(shifts: list[tuple[int, int]]) -> np.ndarray:
    sections = []
    for z, (dx, dy) in enumerate(shifts):
        full = sample_section(z)
        sections.append(full[128 + dy : 128 + dy + SIZE, 128 + dx : 128 + dx + SIZE])
    return np.stack(sections)[:, None]


def run_cpc(src: Path, dst: Path) -> None:
    params = CpcParams(mip=0, patch=32, chunk_windows=4)
    s, d, r = prepare_cpc(str(src), str(dst), None, params)
    cpc(s, d, r, params)


@pytest.fixture(scope="module")
def alignment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/src (unaligned), root/dst/{image, cpc, cpc_source}, as the workflow leaves them."""
    root = tmp_path_factory.mktemp("report")
    make_layer(root / "src", shifted_stack(SOURCE_SHIFTS), max_mip=2)
    make_layer(root / "dst" / "image", shifted_stack(ALIGNED_SHIFTS), max_mip=2)
    run_cpc(root / "dst" / "image", root / "dst" / "cpc")
    run_cpc(root / "src", root / "dst" / "cpc_source")
    return root


@pytest.fixture
def copy_of(alignment: Path, tmp_path: Path) -> Path:
    """A private copy of the alignment, for tests that break it."""
    shutil.copytree(alignment, tmp_path / "a")
    return tmp_path / "a"


class Page(HTMLParser):
    """What the tests look at in the page: section rows, worst blocks, images, links, notes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, str]] = {}
        self.row_classes: dict[int, str] = {}
        self.worst_blocks: list[int] = []
        self.window_rows: list[list[str]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.notes: list[str] = []
        self._table: str | None = None
        self._row: int | None = None
        self._cell: str | None = None
        self._cells: list[str] = []
        self._note = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
        elif tag == "tr" and a.get("data-z") is not None:
            self._row = int(a["data-z"])  # type: ignore[arg-type]
            self._cells = []
            if self._table == "sections":
                self.rows[self._row] = {}
                self.row_classes[self._row] = a.get("class") or ""
        elif tag == "td" and self._row is not None:
            self._cell = (a.get("class") or "").split(" ")[0]
            self._cells.append("")
        elif tag == "div" and "worst-section" in (a.get("class") or "").split():
            self.worst_blocks.append(int(a["data-z"]))  # type: ignore[arg-type]
        elif tag == "img":
            self.images.append(a["src"])  # type: ignore[arg-type]
        elif tag == "a":
            self.links.append(a["href"])  # type: ignore[arg-type]
        elif tag == "p" and a.get("class") == "note":
            self._note = True
            self.notes.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._table == "worst-windows":
                self.window_rows.append(self._cells)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "p":
            self._note = False

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._cell is not None:
            self._cells[-1] += data
            if self._table == "sections" and self._cell:
                self.rows[self._row][self._cell] = self.rows[self._row].get(self._cell, "") + data
        if self._note:
            self.notes[-1] += data


def summaries(layer: Path) -> dict[int, dict]:
    return {int(p.stem): json.loads(p.read_text()) for p in (layer / "summary").glob("*.json")}


def number(text: str) -> float | None:
    return None if text.strip() == "—" else float(text)


def ng_state(url: str) -> dict:
    assert url.startswith(VIEWER + "/#!")
    return json.loads(urllib.parse.unquote(url.split("#!", 1)[1]))


def test_report_shows_every_section_the_worst_first_with_thumbnails_and_links(alignment: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    index = build_report(str(alignment / "src"), str(alignment / "dst"), out, worst=2)
    assert index == out / "index.html"
    page = Page(index.read_text())

    after, before = summaries(alignment / "dst" / "cpc"), summaries(alignment / "dst" / "cpc_source")
    assert sorted(after) == sorted(before) == [1, 2, 3]  # section 0 has no section before it
    # every section has a row, with the medians and 5th percentiles of the summaries
    assert sorted(page.rows) == [0, 1, 2, 3]
    assert number(page.rows[0]["median-after"]) is None and number(page.rows[0]["median-before"]) is None
    for z in (1, 2, 3):
        row = page.rows[z]
        assert number(row["median-after"]) == pytest.approx(after[z]["median"], abs=1e-4)
        assert number(row["median-before"]) == pytest.approx(before[z]["median"], abs=1e-4)
        assert number(row["p5-after"]) == pytest.approx(after[z]["p5"], abs=1e-4)
        assert number(row["p5-before"]) == pytest.approx(before[z]["p5"], abs=1e-4)
        assert number(row["change"]) == pytest.approx(after[z]["median"] - before[z]["median"], abs=2e-4)
        assert after[z]["median"] > before[z]["median"]  # the fixture's alignment did help everywhere

    # the worst sections come first, worst first, and are highlighted in the table
    ranked = sorted(after, key=lambda z: after[z]["median"])
    assert ranked[0] == 2  # the section left with a residual shift
    assert page.worst_blocks == ranked[:2]
    assert {z for z, c in page.row_classes.items() if "worst" in c} == set(ranked[:2])

    # the worst windows: the lowest CPC values of the aligned image's CPC layer, lowest first
    cpc_layer = open_layer(str(alignment / "dst" / "cpc"), LayerKind.QUALITY)
    values = cpc_layer.read(cpc_layer.bounds(0).with_z(1, 4))[:, 0]
    scores = [float(r[5]) for r in page.window_rows]
    assert len(scores) == 2 and scores == sorted(scores)
    assert scores[0] == pytest.approx(float(np.nanmin(values)), abs=1e-4)
    z, x, y = int(page.window_rows[0][1]), float(page.window_rows[0][2]), float(page.window_rows[0][3])
    wz, wy, wx = np.unravel_index(np.nanargmin(values), values.shape)
    assert (z, x, y) == (wz + 1, wx * 32 + 16, wy * 32 + 16)  # window centre in MIP-0 voxels

    # every picture exists and is a real PNG: 2 plots, and per worst section 3 before + 3 after (a section
    # that is z of one worst section and z-1 of another is one file)
    assert len(page.images) == 2 + 2 * 6
    assert {p.name for p in (out / "img").iterdir()} == {Path(s).name for s in page.images}
    for src in page.images:
        path = out / src
        assert not Path(src).is_absolute() and path.stat().st_size > 0
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as png:
            png.verify()
    overlays = [out / s for s in page.images if "overlay" in s]
    assert len(overlays) == 4 and all(Image.open(p).mode == "RGB" for p in overlays)
    with Image.open(out / next(s for s in page.images if s.endswith(f"aligned_z{ranked[0]}_mip0.png"))) as png:
        assert png.size == (SIZE, SIZE) and png.mode == "L"

    # Neuroglancer links to the source and the aligned image for each section, positioned on it
    states = [ng_state(url) for url in page.links]
    sources = {layer["source"] for s in states for layer in s["layers"]}
    assert sources == {"precomputed://http://127.0.0.1:1337/src", "precomputed://http://127.0.0.1:1337/dst/image",
                       "precomputed://http://127.0.0.1:1337/dst/cpc"}
    section_z = {int(s["position"][2]) for s in states if [layer["name"] for layer in s["layers"]] == ["source"]}
    assert section_z == {0, 1, 2, 3}
    assert any(f"seamless serve {alignment}" in note for note in page.notes)
    assert "Not scored by CPC: section 0 (no section 1 before to compare with)." in page.notes
    assert not list(out.rglob("*.tmp"))  # no temporary file left behind


def test_missing_sections_are_named_and_a_rerun_replaces_the_report(copy_of: Path) -> None:
    out = copy_of / "report"
    build_report(str(copy_of / "src"), str(copy_of / "dst"), out, worst=3)
    first = {p.name for p in (out / "img").glob("*.png")}
    (copy_of / "dst" / "cpc_source" / "summary" / "3.json").unlink()

    index = build_report(str(copy_of / "src"), str(copy_of / "dst"), out, worst=1, z_range=(1, 4))
    page = Page(index.read_text())
    assert sorted(page.rows) == [1, 2, 3]
    assert number(page.rows[3]["median-before"]) is None and number(page.rows[3]["median-after"]) is not None
    assert any("cpc_source" in note and "missing section 3;" in note and "--z 3:4" in note and "seamless cpc" in note for note in page.notes)
    now = {p.name for p in (out / "img").glob("*.png")}
    assert now == {Path(s).name for s in page.images} and now < first  # the old worst sections' PNGs are gone


def test_thumbnails_of_an_unbuilt_mip_are_reported_not_fatal(alignment: Path, tmp_path: Path) -> None:
    index = build_report(str(alignment / "src"), str(alignment / "dst"), tmp_path / "r", worst=1, thumb_mip=1)
    page = Page(index.read_text())
    assert page.worst_blocks == [2] and len(page.images) == 2  # the plots only
    assert any("thumbnails unavailable (MIP 1)" in note and "no data" in note for note in page.notes)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_the_report_beside_a_local_destination(alignment: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["report", "--src", str(alignment / "src"), "--dst", str(alignment / "dst"),
                              "--worst", "1", "--z", "1:4"], capsys)
    assert code == ExitCode.OK, err
    assert Path(out.strip()) == alignment / "dst" / "report" / "index.html" and Path(out.strip()).is_file()


def test_cli_refuses_a_destination_without_the_aligned_image_or_any_cpc(copy_of: Path, capsys) -> None:
    args = ["report", "--src", str(copy_of / "src"), "--dst", str(copy_of / "dst"), "--out", str(copy_of / "r")]
    shutil.rmtree(copy_of / "dst" / "cpc")
    code, _, err = run_cli(args, capsys)  # one CPC layer is enough: the page says the other is missing
    assert code == ExitCode.OK, err
    assert "No CPC of the aligned image" in (copy_of / "r" / "index.html").read_text()

    shutil.rmtree(copy_of / "dst" / "cpc_source")
    code, _, err = run_cli(args, capsys)
    assert code == ExitCode.INVALID_INPUT and err.startswith("error: ") and "Traceback" not in err
    assert "neither" in err and "cpc_source" in err and "seamless cpc --src" in err

    shutil.rmtree(copy_of / "dst" / "image")
    code, _, err = run_cli(args, capsys)
    assert code == ExitCode.INVALID_INPUT and "Traceback" not in err
    assert f"no aligned image at file://{copy_of}/dst/image" in err and "seamless render" in err

    code, _, err = run_cli(args[:-2] + ["--z", "3:1"], capsys)
    assert code == ExitCode.INVALID_INPUT and "empty or reversed" in err


def test_a_section_without_tissue_is_named_and_not_ranked(copy_of: Path, tmp_path: Path) -> None:
    image = open_layer(str(copy_of / "dst" / "image"), LayerKind.IMAGE)
    image.write(image.bounds(0).with_z(3), np.zeros((1, 1, SIZE, SIZE), np.uint8))  # a lost section
    run_cpc(copy_of / "dst" / "image", copy_of / "dst" / "cpc")
    assert summaries(copy_of / "dst" / "cpc")[3]["median"] is None

    page = Page(build_report(str(copy_of / "src"), str(copy_of / "dst"), tmp_path / "r", worst=5).read_text())
    assert number(page.rows[3]["median-after"]) is None and number(page.rows[3]["median-before"]) is not None
    assert page.worst_blocks == [2, 1]  # only scored sections are ranked
    assert all(int(row[1]) != 3 for row in page.window_rows)
    assert any("no scored window in section 3" in note for note in page.notes)


def test_folds_and_drift_come_from_the_compose_steps_markers(copy_of: Path, tmp_path: Path, capsys) -> None:
    """Real compose steps, run with restart markers as the workflow runs them, leave the folded share and
    the rigid part of each final field; the page shows both per section and names the sections above the
    fold warning and the most shifted one."""
    import torch

    from seamless_core import fields
    from seamless_core.plan import Layout, compose_step
    from test_folds import folding_field

    dst = copy_of / "dst"
    folding = torch.nn.functional.interpolate(folding_field(), size=(SIZE, SIZE), mode="bilinear") * (SIZE / 96)
    stack = torch.zeros(4, 2, SIZE, SIZE)
    stack[2] = folding[0]  # section 2 folds, 1 and 3 are translations (never fold)
    stack[1, 0], stack[3, 1] = 3.0, -2.0
    make_layer(tmp_path / "voted", stack.numpy(), LayerKind.FIELD, chunk=SIZE, max_mip=0)
    for z in (1, 2, 3):
        marker = Layout(f"file://{dst}").marker(compose_step(z))
        code = main(["--marker", marker, "compose", "--dst", str(dst / "fields" / "final"), "--z", str(z),
                     "--mip", "0", "--field", str(tmp_path / "voted"), "--at", str(z), "--weight", "1"])
        assert code == ExitCode.OK, capsys.readouterr().err
    capsys.readouterr()
    expected = float((fields.jacobian_determinant(stack[2:3]) <= 0).float().mean())
    assert expected > 0.01

    page = Page(build_report(str(copy_of / "src"), str(dst), tmp_path / "r", worst=3).read_text())
    assert page.rows[0]["folds"] == "—"  # the anchor has no compose marker here
    assert page.rows[1]["folds"] == page.rows[3]["folds"] == "0.0 %"
    assert page.rows[2]["folds"] == f"{100 * expected:.1f} %"
    html = (tmp_path / "r" / "index.html").read_text()
    assert "above 1.0 %: sections 2 " in html and "final field folds on" in html
    # the same markers give each final field's rigid part: sections 1 and 3 are pure shifts of 3 and 2 px
    assert page.rows[0]["drift"] == "—"
    assert page.rows[1]["drift"] == "+0.00° / 3.0 px" and page.rows[3]["drift"] == "+0.00° / 2.0 px"
    assert page.rows[1]["bend"] == page.rows[3]["bend"] == "0.0 px"  # a shift does not bend
    assert float(page.rows[2]["bend"].removesuffix(" px")) > 1.0  # the folding ramp does
    shift_2 = page.rows[2]["drift"].split(" / ")[1]  # the folding field also shifts section 2 the most
    assert float(shift_2.removesuffix(" px")) > 3.0
    assert f"shift their centres by up to {shift_2} at MIP 0 (section 2)" in html

    for z in (1, 2, 3):  # without the markers the page says folds were not counted, and why
        (dst / ".seamless" / "steps" / f"{compose_step(z)}.json").unlink()
    page = Page(build_report(str(copy_of / "src"), str(dst), tmp_path / "r2", worst=1).read_text())
    assert {row[column] for row in page.rows.values() for column in ("folds", "drift", "bend")} == {"—"}
    html = (tmp_path / "r2" / "index.html").read_text()
    assert "not counted" in html and "not reported" in html
