"""Peak memory per step against the processing chunk: host RSS, and GPU memory with --device cuda.

Each (step, chunk) runs in a fresh `python` process, exactly as a task runs it (`seamless_core.cli.main`
with the step's command line, on file:// layers built once in a temporary folder). The child reports
its resident set after importing everything (torch, cloudvolume: the floor every task pays), its peak
resident set (the kernel's VmHWM) and, on a GPU, `torch.cuda.max_memory_allocated()`. The step's own
working memory is peak - floor.

From the working memory at each chunk a line mem(c) = a + b * c^2 is fitted per step (least squares over
the chunks measured); on the CPU this is the host memory of the step's tensors and buffers, the proxy
for what the same tensors take on a GPU (same float32 tensors, same chunk plan; the GPU adds the CUDA
context, ~0.3-0.5 GiB, and the caching allocator's slack). The table then says which chunk edge keeps
the working memory under 50 % of a 16 GB T4 and of a 24 GB L4 (headroom for the context, the allocator,
fragmentation and a second process): **extrapolated** from CPU measurements unless --device cuda ran.

With --embedded it also runs the embedded default (scripts/embedded.py: airflow standalone, LocalExecutor,
the local twin) on the sample project and samples the summed RSS of its whole process tree every 0.5 s:
the peak is what a laptop must hold (target < 4 GB).

Run: .venv/bin/python bench/memory.py [--size 2048] [--chunks 256,512,1024,2048] [--device cpu|cuda]
     [--embedded] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GIB = 2**30
T4, L4 = 16e9, 24e9
HEADROOM = 0.5


def status_kib(key: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def child(argv: list[str]) -> None:
    """Run one step in this fresh process; print its memory figures as JSON on the last line."""
    import torch

    import seamless_core.cli as cli
    import seamless_core.markers  # noqa: F401  (what a plan step imports before its own work)
    import seamless_core.volumes  # noqa: F401

    floor = status_kib("VmRSS")
    cuda = torch.cuda.is_available() and "cuda" in argv
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    code = cli.main(argv)
    seconds = time.perf_counter() - started
    peak = status_kib("VmHWM")
    out = {"code": code, "floor_mib": floor / 1024, "peak_mib": peak / 1024, "seconds": seconds}
    if cuda:
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    print("MEMORY " + json.dumps(out), flush=True)


def run_child(argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", "--", *argv], capture_output=True, text=True,
                            cwd=ROOT)
    line = next((l for l in reversed(result.stdout.splitlines()) if l.startswith("MEMORY ")), None)
    if line is None or json.loads(line[7:])["code"] != 0:
        raise SystemExit(f"step failed: {' '.join(argv)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return json.loads(line[7:])


def build(root: Path, size: int) -> dict[str, str]:
    import numpy as np
    import torch

    from seamless_core import fields, synthetic
    from steps import field_layer, image_layer, tiled

    original = torch.from_numpy(tiled(size) / 255.0).float()[None, None]
    misalign = synthetic.section_misalignment(size, size, seed=5, max_translation=12.0, max_rotation_deg=0.5, elastic=3.0)
    deformed = fields.warp(original, misalign)
    stack = torch.cat([original, deformed]).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    paths = {"img": image_layer(root / "img", stack, chunk=256, max_mip=3)}
    smooth = synthetic.smooth_random_field(size, size, amplitude=40.0, wavelength=256).float().numpy()
    paths["field"] = field_layer(root / "field", np.concatenate([smooth.reshape(1, 2, size, size)] * 2), chunk=256)
    for k in range(3):
        noise = synthetic.smooth_random_field(size, size, amplitude=0.5 + 2 * (k == 2), wavelength=128, seed=k + 1)
        paths[f"c{k}"] = field_layer(root / f"c{k}", (smooth + noise.numpy()).reshape(1, 2, size, size), chunk=256)
    return paths


def step_argvs(p: dict[str, str], root: Path, chunk: int, device: str, tag: str) -> dict[str, list[str]]:
    fine = json.dumps([{"mip": 0, "estimators": [{"name": "finetuner", "params": {"max_iterations": 5}}]}])
    bm = json.dumps([{"mip": 2, "estimators": [{"name": "block_matching"}]}])
    out = lambda name: str(root / f"{name}_{tag}")  # noqa: E731
    common = ["--device", device, "--chunk", str(chunk)]
    return {
        "render": ["render", "--src", p["img"], "--field", p["field"], "--dst", out("render"), "--mip", "0", "--z", "1:2", *common],
        "compute_field, finetuner @ MIP 0": ["compute-field", "--src", p["img"], "--tgt", p["img"], "--dst", out("ff"), "--z", "1",
                                             "--tgt-z", "0", "--stages", fine, "--pad", "64", *common],
        "compute_field, finetuner @ MIP 0, batch 4": ["compute-field", "--src", p["img"], "--tgt", p["img"], "--dst", out("ffb"),
                                                      "--z", "1", "--tgt-z", "0", "--stages", fine, "--pad", "64", "--batch", "4",
                                                      *common],
        "compute_field, block matching @ MIP 2": ["compute-field", "--src", p["img"], "--tgt", p["img"], "--dst", out("fb"),
                                                  "--z", "1", "--tgt-z", "0", "--stages", bm, "--pad", "64", *common],
        "vote": ["vote", "--field", p["c0"], "--field", p["c1"], "--field", p["c2"], "--dst", out("vote"), "--agreement",
                 out("agree"), "--z", "0", "--mip", "0", *common],
        "compose": ["compose", "--dst", out("compose"), "--z", "0", "--mip", "0", "--field", p["field"], "--at", "0",
                    "--weight", "0.5", "--field", p["c0"], "--at", "0", "--weight", "1", *common],
        "downsample": ["downsample", "--src", p["img"], "--mip", "0", "--dst-mip", "2", "--z", "0:1", *common],
    }


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """mem = a + b * chunk^2, least squares."""
    xs = [c * c for c, _ in points]
    ys = [m for _, m in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0
    return my - b * mx, b


def largest_chunk(a: float, b: float, budget_mib: float, storage: int = 256) -> int:
    if b <= 0:
        return 1 << 16
    edge = int(((budget_mib - a) / b) ** 0.5) if budget_mib > a else 0
    return edge // storage * storage


def embedded_peak(work: Path, sections: int, fuse: str, port: int) -> dict:
    """Run scripts/embedded.py --exit-after on the sample; sample the process tree's summed RSS."""
    demo = work / "demo"
    subprocess.run([sys.executable, "-m", "seamless_core", "demo", "--out", str(demo), "--no-align", "--sections",
                    str(sections)], cwd=ROOT, check=True, capture_output=True)
    project = work / "project.yaml"
    project.write_text(f"source: {demo / 'misaligned'}\ndestination: {work / 'aligned'}\nsections: {{start: 0, stop: "
                       f"{sections}}}\nstages: serial\nvote: {{k: 3}}\nblocks: {{size: 10, decay_dist: 100}}\n"
                       f"cpc: {{mip: 1, patch: 32}}\ndevice: cpu\nfuse: {fuse}\n")
    warm = Path(tempfile.mkdtemp(prefix="bw-", dir="/tmp"))  # this run's own warm step server (a short socket path)
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "embedded.py"), "--work", str(work), "--project",
                             str(project), "--port", str(port), "--exit-after", "--timeout", "3000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "SEAMLESS_WARM_DIR": str(warm)})
    peak, peak_rss, peak_at, processes, started = 0, 0, 0.0, [], time.monotonic()
    while proc.poll() is None:  # the warm server left the tree (its own session, parent gone): counted too
        pss, rss, members = tree_memory_kib([proc.pid, *pids_naming(str(warm))])
        peak_rss = max(peak_rss, rss)
        if pss > peak:
            peak, peak_at, processes = pss, time.monotonic() - started, members
        time.sleep(0.5)
    output = proc.stdout.read() if proc.stdout else ""
    from seamless_core.warm import stop_servers

    stop_servers(warm)
    shutil.rmtree(warm, ignore_errors=True)
    return {"code": proc.returncode, "peak_mib": peak / 1024, "peak_rss_sum_mib": peak_rss / 1024, "processes": len(processes),
            "by_role_mib": by_role(processes), "peak_at_s": peak_at, "wall_s": time.monotonic() - started, "fuse": fuse,
            "parallelism": os.environ.get("AIRFLOW__CORE__PARALLELISM", "4 (scripts/embedded.py)"), "tail": output[-1500:]}


def by_role(members: list[tuple[str, int]]) -> dict[str, float]:
    """PSS MiB per kind of process at the peak (api-server, scheduler, task runners, step children...)."""
    roles: dict[str, float] = {}
    for command, pss in members:
        name = role(command)
        roles[name] = roles.get(name, 0.0) + pss / 1024
    return dict(sorted(roles.items(), key=lambda item: -item[1]))


def role(command: str) -> str:
    for needle, name in (("seamless_core.warm", "warm step server and its step children"),
                         ("seamless_core", "step child (python -m seamless_core)"), ("api-server", "api-server"),
                         ("api_server", "api-server"), ("dag-processor", "dag-processor"), ("dag_processor", "dag-processor"),
                         ("triggerer", "triggerer"), ("scheduler", "scheduler"), ("serve-logs", "log servers"),
                         ("airflow worker", "executor workers and task runners"),
                         ("standalone", "standalone"), ("embedded.py", "scripts/embedded.py")):
        if needle in command:
            return name
    return command.split(" ")[0].rsplit("/", 1)[-1][:40] or "other"


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains `text`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if text.encode() in fh.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def tree_memory_kib(root_pids: list[int]) -> tuple[int, int, list[tuple[str, int]]]:
    """(PSS, RSS, [(command, PSS)]) over the tree: PSS counts shared pages once (what the machine must hold)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except OSError:
                continue
    pss = rss = 0
    members: list[tuple[str, int]] = []
    stack, seen = list(root_pids), set()
    while stack:
        pid = stack.pop()
        if pid in seen:  # the warm server is in the tree too while the task that started it runs
            continue
        seen.add(pid)
        try:
            rss += status_kib("VmRSS", str(pid))
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                own = next((int(line.split()[1]) for line in fh if line.startswith("Pss:")), 0)
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                command = fh.read().replace(b"\0", b" ").decode(errors="replace")
            pss += own
            members.append((command, own))
        except (OSError, StopIteration):
            pass
        stack += children.get(pid, [])
    return pss, rss, members


def main() -> None:
    if "--child" in sys.argv:
        child(sys.argv[sys.argv.index("--") + 1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--chunks", default="256,512,1024,2048", help="chunk edges; '' for none (--embedded alone)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--embedded", action="store_true", help="also the embedded default's peak RSS on the sample")
    parser.add_argument("--sections", type=int, default=30, help="sections of the sample for --embedded")
    parser.add_argument("--port", type=int, default=0, help="API port of the embedded Airflow (0: a free one)")
    parser.add_argument("--fuse", default="block", help="fuse of the --embedded project (the example project's: block)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    chunks = [int(c) for c in args.chunks.split(",") if c and int(c) <= args.size]
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    started = time.monotonic()
    results: dict[str, list[tuple[int, dict]]] = {}
    embedded = None
    try:
        paths = build(root, args.size)
        for chunk in chunks:
            for name, argv in step_argvs(paths, root, chunk, args.device, f"c{chunk}").items():
                figures = run_child(argv)
                figures["load"] = os.getloadavg()[0]
                results.setdefault(name, []).append((chunk, figures))
                print(f"{name} chunk {chunk}: floor {figures['floor_mib']:.0f} MiB, peak {figures['peak_mib']:.0f} MiB"
                      + (f", GPU {figures['gpu_peak_mib']:.0f} MiB" if "gpu_peak_mib" in figures else "")
                      + f", {figures['seconds']:.1f} s, load {figures['load']:.1f}", flush=True)
        if args.embedded:
            import embedded_env

            embedded = embedded_peak(root / "embedded", args.sections, args.fuse, args.port or embedded_env.free_port())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if embedded is not None:
        embedded["load"] = os.getloadavg()[0]
    if embedded is not None:  # its own section and results file, with or without the per-step figures
        text = embedded_text(args, embedded)
        print(text)
        if args.out:
            from report import save_results, write_section

            write_section(args.out, "embedded_memory", "Memory of the embedded default", text)
            save_results("memory_embedded", {"sections": args.sections, "embedded": embedded})
    if not chunks:
        return
    text = render(args, chunks, results, None, time.monotonic() - started)
    print(text)
    if args.out:
        from report import write_section

        write_section(args.out, "memory", "Memory per step against the chunk size", text)
        from report import save_results

        save_results("memory" if args.device == "cpu" else f"memory_{args.device.split(':')[0]}", {
            "size": args.size, "device": args.device, "embedded": embedded,
            "steps": {name: [{"chunk": c, **f} for c, f in points] for name, points in results.items()}})


def embedded_text(args, embedded: dict) -> str:
    return (f"Embedded default (scripts/embedded.py --exit-after: airflow standalone, LocalExecutor with "
            f"`[core] parallelism` {embedded['parallelism']}, the local twin; the sample project, {args.sections} sections, "
            f"fuse {embedded['fuse']}): peak memory of its whole process tree **{embedded['peak_mib']:.0f} MiB PSS** "
            f"({embedded['peak_mib'] / 1024:.2f} GiB; target < 4 GB: {'met' if embedded['peak_mib'] * 2**20 < 4e9 else 'MISSED'}; "
            f"PSS counts each shared page once: what the machine must hold), {embedded['processes']} processes, at "
            f"{embedded['peak_at_s']:.0f} s of {embedded['wall_s']:.0f} s (exit code {embedded['code']}); summing each "
            f"process's RSS instead gives {embedded['peak_rss_sum_mib']:.0f} MiB (shared libraries counted once per "
            f"process). At the peak, PSS by kind of process: " + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in
            embedded.get("by_role_mib", {}).items()) + f". Load average {embedded.get('load', float('nan')):.1f} at the end. Command: `.venv/bin/python "
            f"bench/memory.py --chunks '' --embedded --out docs/benchmarks.md`.")


def render(args, chunks: list[int], results: dict, embedded: dict | None, wall: float) -> str:
    gpu = args.device.startswith("cuda")
    head = "| step | " + " | ".join(f"chunk {c}: peak (working) MiB" + (" / GPU MiB" if gpu else "") for c in chunks)
    head += " | fit: working MiB = a + b·chunk² | largest chunk for 50 % of a T4 (16 GB) / L4 (24 GB) | s at the default 1024 | load avg |"
    rows = [head, "|---|" + "---:|" * len(chunks) + "---|---|---:|---:|"]
    verdicts = []
    for name, points in results.items():
        cells = []
        for _, f in points:
            working = f["peak_mib"] - f["floor_mib"]
            cells.append(f"{f['peak_mib']:.0f} ({working:.0f})" + (f" / {f['gpu_peak_mib']:.0f}" if gpu else ""))
        series = [(c, (f["gpu_peak_mib"] if gpu else f["peak_mib"] - f["floor_mib"])) for c, f in points]
        a, b = fit(series)
        t4 = largest_chunk(a, b, HEADROOM * T4 / 2**20)
        l4 = largest_chunk(a, b, HEADROOM * L4 / 2**20)
        at_default = a + b * 1024**2
        verdicts.append((name, at_default, t4, l4))
        secs = next((f["seconds"] for c, f in points if c == 1024), float("nan"))
        loads = max(f["load"] for _, f in points)
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {a:.0f} + {b * 1e6:.1f}e-6·c² | {t4} / {l4} | {secs:.1f} | {loads:.1f} |")
    floor = min(f["floor_mib"] for pts in results.values() for _, f in pts)
    lines = [
        f"Section {args.size}² px on file:// layers, device {args.device}; each (step, chunk) in a fresh process, as a task "
        f"runs it. Floor (torch, cloudvolume and the CLI imported, before the step): {floor:.0f} MiB RSS. Working = peak - floor. "
        "The finetuner ran 5 iterations (its memory does not grow with iterations).",
        "",
        *rows,
        "",
    ]
    if gpu:
        lines.append("GPU figures: `torch.cuda.max_memory_allocated()` of each step, measured on this device.")
    else:
        worst = max(verdicts, key=lambda v: v[1])
        lines.append(
            f"**Extrapolated, not measured on a GPU**: the working host memory of the step's float32 tensors stands in for "
            f"the device memory the same tensors take (plus the CUDA context). At the default processing chunk (1024) "
            f"the largest working set is {worst[0]}'s, {worst[1]:.0f} MiB: "
            + ("under 50 % of a T4 and of an L4 for every step" if all(v[1] < HEADROOM * T4 / 2**20 for v in verdicts)
               else "ABOVE 50 % of a T4 for " + ", ".join(v[0] for v in verdicts if v[1] >= HEADROOM * T4 / 2**20))
            + ". Rerun with `--device cuda` on a lent GPU to replace the extrapolation by `max_memory_allocated`.")
    if embedded is not None:
        lines += ["", embedded_text(args, embedded)]
    lines += ["", f"Benchmark wall time {wall:.0f} s. Command: `.venv/bin/python bench/memory.py --size {args.size} "
              f"--chunks {args.chunks} --device {args.device}{' --embedded' if args.embedded else ''} --out docs/benchmarks.md`."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
