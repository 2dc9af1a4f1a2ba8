"""What-if experiments for the render step: how much each proposed seamless_core change would gain.

Each variant applies one proposed change *at run time* (monkeypatching, nothing in seamless_core is
edited) and renders the same inputs as bench/render_throughput.py, interleaving the variants round
after round so that a noisy neighbour hurts them all alike:

* ``base``       -- seamless_core as it is (with the project's default compression for images);
* ``lru``        -- decoded-chunk LRU on the source layer's CloudVolume handle, so the storage chunks
                    that neighbouring processing chunks share are read and decoded once
                    (proposal: Layer.cv passes lru_bytes=..., lru_encoding="raw" for image/mask layers);
* ``finite``     -- read_field checks finiteness with one torch.aminmax instead of
                    torch.isfinite(field).all(), on the coarse field before it is upsampled
                    (proposal: steps/common.py read_field);
* ``all``        -- both together.

This file exists to evaluate those proposals; once seamless_core adopts (or rejects) them, delete it
or drop the matching variant. The patches reach into seamless_core and CloudVolume internals and break
loudly (AttributeError) if those move.

Run:  .venv/bin/python bench/render_whatif.py [--size 4096] [--chunk 1024] [--rounds 3]
                                              [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import render_throughput as rt  # noqa: E402
from cloudvolume.lru import LRU  # noqa: E402

from seamless_core import fields, volumes  # noqa: E402
from seamless_core.errors import InputError  # noqa: E402
from seamless_core.steps import common  # noqa: E402
from seamless_core.steps import render as render_step  # noqa: E402

START = "<!-- render-whatif:start -->"
END = "<!-- render-whatif:end -->"
LRU_BYTES = 256 * 2**20
VARIANTS = ("base", "lru", "finite", "all")


# --------------------------------------------------------------------------------------------------
# the proposed changes, as run-time patches
# --------------------------------------------------------------------------------------------------
def _finite_or_raise(layer: volumes.Layer, box, tensor: torch.Tensor) -> None:
    lo, hi = torch.aminmax(tensor)  # NaN propagates into both, +-inf shows up in one
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"field {layer.path} holds NaN or infinite values in {box}; "
                         "recompute that section's field")


def read_field_aminmax(layer, box, field_mip, device):
    """common.read_field, its finiteness check one aminmax on the field as read (before upsampling)."""
    if field_mip == box.mip:
        field = common.to_tensor(common.read_clamped(layer, box), device)
        _finite_or_raise(layer, box, field)
    elif field_mip > box.mip:
        factor = common._xy_factor(layer, field_mip, box.mip)
        coarse = box.to_mip(field_mip, layer.factors).padded(1)
        raw = common.to_tensor(common.read_clamped(layer, coarse), device)
        _finite_or_raise(layer, box, raw)
        field = fields.resample(raw, field_mip, box.mip)
        left = box.start[0] - coarse.start[0] * factor
        top = box.start[1] - coarse.start[1] * factor
        field = field[..., top : top + box.size[1], left : left + box.size[0]]
    else:
        raise InputError(f"field MIP {field_mip} is finer than the render MIP {box.mip}")
    return field.contiguous()


@contextlib.contextmanager
def patched(variant: str) -> Iterator[None]:
    original_cv = volumes.Layer.cv
    original_read_field = render_step.read_field

    def cv_with_lru(self, mip):
        handle = original_cv(self, mip)
        if self.kind in (volumes.LayerKind.IMAGE, volumes.LayerKind.MASK) and handle.image.lru.size == 0:
            handle.image.lru = LRU(LRU_BYTES, size_in_bytes=True)
            handle.image._lru_encoding = "raw"
        return handle

    try:
        if variant in ("lru", "all"):
            volumes.Layer.cv = cv_with_lru
        if variant in ("finite", "all"):
            render_step.read_field = read_field_aminmax
        yield
    finally:
        volumes.Layer.cv = original_cv
        render_step.read_field = original_read_field


def run_variant(inp: rt.Inputs, variant: str, chunk: int, field_mip: int,
                tag: str) -> tuple[float, float, str]:
    """One render with `variant`'s patches: wall s, CPU s, and a digest of the layer it wrote."""
    params = render_step.RenderParams(mip=0, field_mip=field_mip, chunk_xy=chunk)
    dst = "file://" + os.path.join(inp.root, f"whatif_{variant}_{tag}")
    field_path = inp.field0 if field_mip == 0 else inp.field2
    with patched(variant):
        c0, t0 = time.process_time(), time.perf_counter()
        src, fld, out, mask, region = render_step.prepare_render(inp.src, field_path, dst, None, params)
        render_step.render(src, fld, out, region, params, mask=mask, progress_interval=1e9)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    digest = hashlib.sha1(out.read(out.bounds(0)).tobytes()).hexdigest()
    shutil.rmtree(dst.removeprefix("file://"), ignore_errors=True)
    return wall, cpu, digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each runs every variant twice (default 3)")
    parser.add_argument("--out", help="markdown file whose render-whatif section is rewritten")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="render-whatif-")
    try:
        inp = rt.build_inputs(root, args.size)
        image = torch.from_numpy(inp.image).to(torch.float32)[None, None]
        grid = rt.normalised_grid(inp.field_m0, torch.device("cpu"))
        ref_times = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros",
                                            align_corners=False)
            ref_times.append(time.perf_counter() - t0)
        ref = args.size**2 / 1e6 / min(ref_times[1:])
        del image, grid
        inp.field_m0 = None
        results: dict[tuple[str, int], list[tuple[float, float, str]]] = {}
        for rnd in range(args.rounds):
            for field_mip in (0, rt.FIELD_MIP):
                for variant in VARIANTS:
                    for rep in range(2):
                        results.setdefault((variant, field_mip), []).append(
                            run_variant(inp, variant, args.chunk, field_mip, f"{rnd}_{rep}_{field_mip}"))
            print(f"[{time.perf_counter() - started:6.1f} s] round {rnd + 1}/{args.rounds}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    mpx = args.size**2 / 1e6
    lines = ["| variant | field MIP | best s | Mpx/s | ÷ grid_sample | CPU s | vs base | output = base |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for field_mip in (0, rt.FIELD_MIP):
        base_runs = results[("base", field_mip)]
        base = min(r[0] for r in base_runs)
        for variant in VARIANTS:
            runs = results[(variant, field_mip)]
            wall, cpu, _ = min(runs)
            same = "yes" if {r[2] for r in runs} == {r[2] for r in base_runs} else "**no**"
            lines.append(f"| {variant} | {field_mip} | {wall:.3f} | {mpx / wall:.1f} | "
                         f"{mpx / wall / ref:.2f} | "
                         f"{cpu:.2f} | {base / wall:.2f}x | {same} |")
    body = "\n".join([
        *lines,
        "",
        f"{args.size}² uint8 ({inp.compress}), chunk {args.chunk}, best of {2 * args.rounds} interleaved "
        "runs per variant; "
        f"raw grid_sample reference {ref:.1f} Mpx/s; {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); command `.venv/bin/python bench/render_whatif.py "
        + " ".join(sys.argv[1:]) + "`.",
    ])
    print(body)
    if args.out:
        section = f"{START}\n{body}\n{END}"
        text = open(args.out).read() if os.path.exists(args.out) else "# Benchmarks\n\n"
        if START in text and END in text:
            text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: section, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n## Render what-ifs\n\n" + section + "\n"
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
