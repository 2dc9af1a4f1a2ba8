"""Per-step throughput against the limit each step should approach, measured in the same run.

Every step runs as the CLI runs it (`prepare_*` + the step function, on file:// layers in a temporary
folder, chunk by chunk with read-ahead and write-behind), and next to it, on the very same data held in
memory, the bare computation it should approach:

| step | limit (same run, same data, in memory) |
|---|---|
| render | raw `F.grid_sample` of the whole section (float32 image, normalised grid) |
| compute_field, finetuner | a bare torch loop: Adam on the field, the same loss (MSE of the warped blurred source against the blurred target + Charbonnier smoothness), the same number of iterations, the same padded chunk |
| compute_field, block matching / pyramid | the estimator alone on the same padded chunk in memory |
| vote, compose, downsample | the bytes the step must read and write at this machine's copy bandwidth (a `torch` copy of 256 MiB), and the step's arithmetic alone in memory |

Cases are interleaved round by round (a burst of load from another process costs one repeat of several
cases, not every repeat of one), best of --repeats; every row carries the load average at its end.
The ratios (step / limit) are what to compare across machines and runs: both sides feel the same load.

Acceptance of issue 8 on CPU: render >= 0.5 x raw grid_sample; the finetuner step within 2x of the
bare loop (ratio >= 0.5).

Run: .venv/bin/python bench/steps.py [--size 2048] [--repeats 3] [--iterations 50] [--device cpu|cuda] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import save_results, write_section  # noqa: E402
from seamless_core import fields, synthetic  # noqa: E402
from seamless_core.volumes import DEFAULT_CHUNK_XY  # noqa: E402
from seamless_core.estimators.base import Pair  # noqa: E402
from seamless_core.estimators.block_matching import masked_blur  # noqa: E402
from seamless_core.estimators.finetuner import flush_denormal  # noqa: E402
from seamless_core.estimators.spec import build_estimator, parse_stages  # noqa: E402
from seamless_core.geometry import BBox  # noqa: E402
from seamless_core.steps.compose import ComposeParams, compose_fields, prepare_compose  # noqa: E402
from seamless_core.steps.compute_field import ComputeFieldParams, compute_field, prepare_compute_field  # noqa: E402
from seamless_core.steps.downsample import DownsampleParams, downsample, prepare_downsample  # noqa: E402
from seamless_core.steps.render import RenderParams, prepare_render, render  # noqa: E402
from seamless_core.steps.vector_vote import VoteParams, prepare_vote, vote_fields  # noqa: E402
from seamless_core.vote import vector_vote  # noqa: E402
from seamless_core.volumes import LayerKind, create_from_info, make_image_info, open_layer  # noqa: E402

RESOLUTION = (4.0, 4.0, 40.0)
ISBI = ROOT.parent / "shared" / "data" / "isbi2012"


def load() -> float:
    return os.getloadavg()[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    name: str
    kind: str  # "step" or "limit"
    megapixels: float  # MIP-0 px of the section the case covers (Mpx/s in the unit a user scales by)
    run: Callable[[], None]
    setup: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def mpx_s(self) -> float:
        return self.megapixels / self.best


def measure(cases: list[Case], repeats: int, device: torch.device) -> None:
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, caches, lazy imports)
        for case in cases:
            case.setup()
            sync(device)
            started = time.perf_counter()
            case.run()
            sync(device)
            elapsed = time.perf_counter() - started
            if round_:
                case.times.append(elapsed)
                case.loads.append(load())
        print(f"round {round_}: " + ", ".join(f"{c.name} {c.times[-1] if c.times else float('nan'):.3f}" for c in cases),
              flush=True)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def tiled(size: int) -> np.ndarray:
    paths = sorted(ISBI.glob("*.png"))
    if paths:
        from PIL import Image

        tiles = [np.asarray(Image.open(p)) for p in paths]
    else:
        tiles = [np.random.default_rng(0).integers(1, 255, (512, 512), np.uint8)]
    n = max(1, size // 512)
    rows = [np.concatenate([tiles[(r * n + c) % len(tiles)] for c in range(n)], axis=1) for r in range(n)]
    return np.concatenate(rows, axis=0)[:size, :size]


def image_layer(path: Path, data: np.ndarray, chunk: int, max_mip: int = 2) -> str:
    depth = data.shape[0]
    size = data.shape[-1]
    info = make_image_info(dtype="uint8", resolution=RESOLUTION, size=(size, size, depth), chunk_xy=chunk, max_mip=max_mip,
                           kind=LayerKind.IMAGE)
    layer = create_from_info(str(path), info, LayerKind.IMAGE)
    layer.write(BBox((0, 0, 0), (size, size, depth)), data)
    params = DownsampleParams(src_mip=0, dst_mip=max_mip)
    lay, region = prepare_downsample(str(path), LayerKind.IMAGE, None, params)
    downsample(lay, region, params)
    return str(path)


def field_layer(path: Path, data: np.ndarray, chunk: int) -> str:
    depth, _, size, _ = data.shape
    info = make_image_info(dtype="float32", resolution=RESOLUTION, size=(size, size, depth), chunk_xy=chunk, max_mip=0,
                           kind=LayerKind.FIELD)
    layer = create_from_info(str(path), info, LayerKind.FIELD)
    layer.write(BBox((0, 0, 0), (size, size, depth)), data)
    return str(path)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second moved (read + written) by a copy of 256 MiB, best of 5."""
    a = torch.empty(64 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(6):
        sync(device)
        started = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * a.numel() * 4 / best


# --------------------------------------------------------------------------------------------------
# the finetuner without the pipeline
# --------------------------------------------------------------------------------------------------
def bare_adam(src: torch.Tensor, tgt: torch.Tensor, offset: tuple[int, int], iterations: int, *, lr: float = 0.1,
              smoothness: float = 0.005, eps: float = 0.05, blur: float = 1.0) -> torch.Tensor:
    """Adam on a dense field with the finetuner's default loss, nothing else: the reference loop."""
    valid_t = tgt > 0
    valid_s = src > 0
    src_b = masked_blur(src, valid_s, blur)
    tgt_b = masked_blur(tgt, valid_t, blur)
    valid = valid_t.float()
    count = valid.sum().clamp_min(1.0)
    h, w = tgt.shape[-2:]
    hs, ws = src.shape[-2:]
    # grid_sample's normalised coordinates of target pixel p + offset + field
    ys = (torch.arange(h, dtype=torch.float32, device=tgt.device) + offset[1]) * (2 / hs) + (1 / hs - 1)
    xs = (torch.arange(w, dtype=torch.float32, device=tgt.device) + offset[0]) * (2 / ws) + (1 / ws - 1)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
    scale = torch.tensor([2 / ws, 2 / hs], device=tgt.device)
    field_ = torch.zeros(1, 2, h, w, device=tgt.device, requires_grad=True)
    optimiser = torch.optim.Adam([field_], lr=lr)
    pixels = float(h * w)
    with flush_denormal():  # the standard CPU fix for grid_sample's backward (denormals cost ~4x); the finetuner has it too
        _adam_loop(src_b, tgt_b, valid, count, base, scale, field_, optimiser, pixels, iterations, smoothness, eps)
    return field_.detach()


def _adam_loop(src_b, tgt_b, valid, count, base, scale, field_, optimiser, pixels, iterations, smoothness, eps) -> None:
    for _ in range(iterations):
        optimiser.zero_grad(set_to_none=True)
        grid = torch.addcmul(base, field_.permute(0, 2, 3, 1), scale)
        warped = F.grid_sample(src_b, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        data = ((warped - tgt_b).square() * valid).sum() / count
        dx = field_[..., :, 1:] - field_[..., :, :-1]
        dy = field_[..., 1:, :] - field_[..., :-1, :]
        e2 = eps**2
        penalty = (dx.square().sum(1) + e2).sqrt().mean() + (dy.square().sum(1) + e2).sqrt().mean() - 2 * eps
        ((data + smoothness * penalty) * pixels).backward()
        optimiser.step()


# --------------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------------
def build(root: Path, size: int, chunk: int, iterations: int, device: torch.device) -> tuple[list[Case], dict]:
    dev = str(device)
    original = torch.from_numpy(tiled(size) / 255.0).float()[None, None]
    misalign = synthetic.section_misalignment(size, size, seed=5, max_translation=12.0, max_rotation_deg=0.5, elastic=3.0)
    deformed = fields.warp(original, misalign)
    stack = torch.cat([original, deformed]).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    img = image_layer(root / "img", stack, chunk=256)
    smooth = synthetic.smooth_random_field(size, size, amplitude=40.0, wavelength=256).float()
    fld = field_layer(root / "field", np.concatenate([smooth.numpy().reshape(1, 2, size, size)] * 2), chunk=512)
    candidates = []
    for k in range(3):  # three vote candidates near each other, one a little off
        noise = synthetic.smooth_random_field(size, size, amplitude=0.5 + 2.0 * (k == 2), wavelength=128, seed=k + 1)
        candidates.append(field_layer(root / f"cand{k}", (smooth + noise.float()).numpy().reshape(1, 2, size, size), 512))
    mpx = size * size / 1e6
    section = BBox((0, 0, 1), (size, size, 2))
    cases: list[Case] = []
    info: dict = {"size": size, "chunk": chunk}

    # --- render against raw grid_sample -------------------------------------------------------
    rparams = RenderParams(mip=0, chunk_xy=1024 if size >= 1024 else None, device=dev)

    img_default = image_layer(root / "img512", stack, chunk=DEFAULT_CHUNK_XY)  # derived layers' storage chunk

    def run_render(source: str = img_default, name: str = "rendered") -> None:
        s, f, d, _, r = prepare_render(source, fld, str(root / name), section.with_z(1), rparams)
        render(s, f, d, r, rparams)

    image_t = torch.from_numpy(stack[1:2].astype(np.float32)).to(device)
    grid_t = fields.pixel_grid(size, size)
    norm = torch.tensor([2 / size, 2 / size]).view(1, 2, 1, 1)
    grid_t = ((grid_t + smooth.float()) * norm + (1 / size - 1)).permute(0, 2, 3, 1).contiguous().to(device)
    raw_warp = lambda: F.grid_sample(image_t, grid_t, align_corners=False)  # noqa: E731
    cases += [Case("render", "step", mpx, run_render,
                   note=f"prepare_render + render, chunk 1024, file:// in and out, {DEFAULT_CHUNK_XY}² storage chunks"),
              Case("render", "limit", mpx, raw_warp, note="raw F.grid_sample, whole section in memory"),
              Case("render, 256² storage chunks", "step", mpx, lambda: run_render(img, "rendered256"),
                   note="as above, source and destination in 256² storage chunks (`seamless ingest`'s default): "
                        "4x the files, each written and fsynced"),
              Case("render, 256² storage chunks", "limit", mpx, raw_warp, note="raw F.grid_sample, whole section in memory")]

    # --- compute_field: finetuner against a bare Adam loop, on one chunk --------------------------
    one = BBox((0, 0, 1), (chunk, chunk, 2))
    fine = {"name": "finetuner", "params": {"max_iterations": iterations, "patience": 10**6, "min_improvement": 0.0}}
    cparams = ComputeFieldParams(stages=parse_stages([{"mip": 0, "estimators": [fine]}]), chunk_xy=chunk, pad=64,
                                 device=dev, on_empty_target="init")

    def run_finetuner() -> None:
        s, t, d, r, _, _ = prepare_compute_field(img, img, str(root / "f_fine"), one, 1, 0, cparams)
        compute_field(s, t, d, r, 0, cparams)

    src_layer = open_layer(img, LayerKind.IMAGE)
    padded = one.padded(64)
    margin = 8
    window = padded.padded(margin)
    src_t = torch.from_numpy(_read0(src_layer, window.with_z(1)) / 255.0).float().to(device)
    tgt_t = torch.from_numpy(_read0(src_layer, padded.with_z(0)) / 255.0).float().to(device)
    cmpx = chunk * chunk / 1e6
    cases += [Case("compute_field, finetuner", "step", cmpx, run_finetuner,
                   note=f"one {chunk}² chunk at MIP 0, pad 64, {iterations} iterations (no early stop)"),
              Case("compute_field, finetuner", "limit", cmpx, lambda: bare_adam(src_t, tgt_t, (margin, margin), iterations),
                   note=f"bare Adam loop, same loss, {iterations} iterations, same padded chunk in memory")]

    # --- compute_field: block matching and pyramid at MIP 2, step against the estimator alone -----
    for name in ("block_matching", "pyramid"):
        spec = parse_stages([{"mip": 2, "estimators": [{"name": name}]}])
        params = ComputeFieldParams(stages=spec, chunk_xy=None, pad=64, device=dev, on_empty_target="init")

        def run_estimator_step(params=params, name=name) -> None:
            s, t, d, r, _, _ = prepare_compute_field(img, img, str(root / f"f_{name}"), section, 1, 0, params)
            compute_field(s, t, d, r, 0, params)

        estimator = build_estimator(spec.stages[0].estimators[0])
        quarter = size // 4
        box = BBox((0, 0, 1), (quarter, quarter, 2), 2).padded(64)
        src2 = torch.from_numpy(_read_clamped(src_layer, box.padded(getattr(estimator, "margin", 0)))).float().div(255).to(device)
        tgt2 = torch.from_numpy(_read_clamped(src_layer, box.with_z(0))).float().div(255).to(device)
        m = getattr(estimator, "margin", 0)
        pair = Pair(src=src2, tgt=tgt2, offset=(m, m))
        cases += [Case(f"compute_field, {name}", "step", mpx, run_estimator_step, note="whole section at MIP 2, storage chunks"),
                  Case(f"compute_field, {name}", "limit", mpx, lambda e=estimator, p=pair: e(p, None),
                       note="the estimator alone on the whole padded section in memory")]

    # --- vote ----------------------------------------------------------------------------------
    vparams = VoteParams(mip=0, device=dev)

    def run_vote() -> None:
        c, v, a, r = prepare_vote(candidates, str(root / "voted"), str(root / "agreement"), None, 0, vparams)
        vote_fields(c, v, a, r, vparams)

    stacked = torch.stack([torch.from_numpy(open_layer(c, LayerKind.FIELD).read(BBox((0, 0, 0), (size, size, 1)))).to(device)
                           for c in candidates])
    cases += [Case("vote", "step", mpx, run_vote, note="prepare_vote + vote_fields, 3 candidates at MIP 0"),
              Case("vote", "kernel", mpx, lambda: vector_vote(stacked), note="vector_vote of the whole section in memory")]
    info["vote_bytes"] = 3 * 8 + 8 + 4

    # --- compose -------------------------------------------------------------------------------
    cpar = ComposeParams(mip=0, device=dev)

    def run_compose() -> None:
        terms, dst, region = prepare_compose([(fld, 0, 0.5), (candidates[0], 0, 1.0)], str(root / "composed"), 0, None, cpar)
        compose_fields(terms, dst, region, cpar)

    f_a = smooth.float().to(device)
    f_b = stacked[0]

    def compose_kernel() -> None:
        d = 0.5 * f_a
        fields.sample(f_b, fields.pixel_grid(size, size, device=device) + d, padding="border").add_(d)

    cases += [Case("compose", "step", mpx, run_compose, note="prepare_compose + compose_fields, 2 terms at MIP 0"),
              Case("compose", "kernel", mpx, compose_kernel, note="the same composition of the whole section in memory")]
    info["compose_bytes"] = 2 * 8 + 8

    # --- downsample ----------------------------------------------------------------------------
    dparams = DownsampleParams(src_mip=0, dst_mip=2, device=dev)

    def run_downsample() -> None:
        lay, region = prepare_downsample(img, LayerKind.IMAGE, BBox((0, 0, 0), (size, size, 1)), dparams)
        downsample(lay, region, dparams)

    img_f = torch.from_numpy(stack[:1].astype(np.float32)).to(device)

    def downsample_kernel() -> None:
        a = F.avg_pool2d(img_f, 2)
        F.avg_pool2d(a, 2)

    cases += [Case("downsample", "step", mpx, run_downsample, note="prepare_downsample + downsample, MIP 0 -> 2, uint8"),
              Case("downsample", "kernel", mpx, downsample_kernel, note="two avg_pool2d of the section in memory")]
    info["downsample_bytes"] = 1 + 0.25 * 2 + 0.0625
    return cases, info


def _read0(layer, box: BBox) -> np.ndarray:
    return _read_clamped(layer, box)


def _read_clamped(layer, box: BBox) -> np.ndarray:
    from seamless_core.steps.common import read_clamped

    return read_clamped(layer, box).astype(np.float32)


# --------------------------------------------------------------------------------------------------
def table(cases: list[Case], info: dict, bandwidth: float, args: argparse.Namespace, device: torch.device,
          wall: float, loads: tuple[float, float]) -> tuple[str, dict]:
    by = {}
    for c in cases:
        by.setdefault(c.name, {})[c.kind] = c
    rows, ratios = [], {}
    for name, group in by.items():
        step = group["step"]
        limit = group.get("limit")
        kernel = group.get("kernel")
        key = {"vote": "vote_bytes", "compose": "compose_bytes", "downsample": "downsample_bytes"}.get(name)
        bw_mpx = bandwidth / info[key] / 1e6 if key else None
        if limit is not None:
            ratio = step.mpx_s / limit.mpx_s
            ref = f"{limit.mpx_s:.1f} ({limit.note})"
        else:
            ratio = step.mpx_s / bw_mpx if bw_mpx else float("nan")
            ref = f"{bw_mpx:.0f} (copy bandwidth / {info[key]:g} B per px read + written)"
        ratios[name] = ratio
        kern = f"{kernel.mpx_s:.1f} ({step.mpx_s / kernel.mpx_s:.2f})" if kernel else "-"
        rows.append(f"| {name} | {step.mpx_s:.2f} | {step.best:.3f} | {ref} | **{ratio:.2f}** | {kern} | "
                    f"{max(step.loads):.1f} |")
    text = "\n".join([
        f"Section {info['size']}² px (ISBI 2012 sections tiled, and a copy misaligned by a smooth field), device "
        f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}); best of {args.repeats}, cases interleaved; copy "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s (read + written). Mpx/s in MIP-0 px of the section "
        f"(the finetuner: of its one chunk).",
        "",
        "| step | Mpx/s | best s | limit Mpx/s (what) | step / limit | in-memory kernel Mpx/s (step / kernel) | load avg |",
        "|---|---:|---:|---|---:|---|---:|",
        *rows,
        "",
        f"Acceptance on CPU: render / raw grid_sample = {ratios['render']:.2f} (target >= 0.5: "
        f"{'met' if ratios['render'] >= 0.5 else 'MISSED'}; with 256² storage chunks "
        f"{ratios['render, 256² storage chunks']:.2f}); finetuner step / bare Adam loop = "
        f"{ratios['compute_field, finetuner']:.2f} (target >= 0.5, i.e. within 2x: "
        f"{'met' if ratios['compute_field, finetuner'] >= 0.5 else 'MISSED'}). Load average {loads[0]:.1f} at the start, "
        f"{loads[1]:.1f} at the end; benchmark wall time {wall:.0f} s. Command: `.venv/bin/python bench/steps.py "
        f"--size {info['size']} --repeats {args.repeats} --iterations {args.iterations} --out docs/benchmarks.md`.",
    ])
    results = {"device": str(device), "threads": torch.get_num_threads(), "size": info["size"],
               "iterations": args.iterations, "copy_bandwidth_gbs": bandwidth / 1e9,
               "steps": {name: {"mpx_s": g["step"].mpx_s, "best_s": g["step"].best, "ratio": ratios[name],
                                "limit_mpx_s": g["limit"].mpx_s if "limit" in g else None,
                                "kernel_mpx_s": g["kernel"].mpx_s if "kernel" in g else None,
                                "load": max(g["step"].loads)} for name, g in by.items()}}
    return text, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="section edge in px (a multiple of 512)")
    parser.add_argument("--chunk", type=int, default=512, help="the finetuner's chunk edge at MIP 0")
    parser.add_argument("--iterations", type=int, default=50, help="finetuner iterations (both sides)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    start_load = load()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="bench-steps-"))
    try:
        cases, info = build(root, args.size, args.chunk, args.iterations, device)
        bandwidth = copy_bandwidth(device)
        measure(cases, args.repeats, device)
        text, results = table(cases, info, bandwidth, args, device, time.monotonic() - started, (start_load, load()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(text)
    if args.out:
        write_section(args.out, "steps", "Per step: throughput against its limit", text)
        save_results("steps" if args.device == "cpu" else f"steps_{args.device.split(':')[0]}", results)


if __name__ == "__main__":
    main()
