"""The embedded default: `airflow standalone` (SQLite, LocalExecutor) running the seamless_align DAG
with the local twin on the demo volume, one alignment run triggered and waited for.

Run by scripts/demo.sh after `seamless demo --no-align` built the misaligned demo volume. Everything
lives under the working folder (AIRFLOW_HOME = <work>/airflow). Prints the UI address, where the login
password is, and the Neuroglancer link; then keeps Airflow running until Ctrl-C (--exit-after: stop).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def environment(work: Path, port: int, project: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),  # standalone starts `airflow ...` children
        "AIRFLOW_HOME": str(work / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),  # registers the section-block timetable
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # a laptop: at most 4 tasks at once (each a task runner plus a `python -m seamless_core` child with torch,
        # ~0.5 GiB together), so the whole tree stays under 4 GB; Airflow's default, 32, does not (docs/dags.md)
        "AIRFLOW__CORE__PARALLELISM": os.environ.get("AIRFLOW__CORE__PARALLELISM", "4"),
        # one API worker (Airflow's default starts several, each a full copy of Airflow): one user on a laptop
        "AIRFLOW__API__WORKERS": os.environ.get("AIRFLOW__API__WORKERS", "1"),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
        "SEAMLESS_EXECUTOR": "local",
        "SEAMLESS_PROJECT": str(project),
        "SEAMLESS_PROGRESS_INTERVAL": "5",
        "PYTHONPATH": str(ROOT),
    }


def airflow(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"`airflow {' '.join(args)}` failed:\n{result.stderr[-2000:]}")
    return result.stdout


def free_port() -> int:
    """A port nobody listens on now, for tests and benchmarks that start their own Airflow."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    return port if port != 8793 else free_port()  # 8793 is Airflow's own log server


def refuse_busy_port(port: int) -> None:
    """Airflow's api-server dies on a taken port long after start; say so before anything starts."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise SystemExit(f"port {port} is in use (another Airflow, or another service); pass --port N") from None
    if port == 8793:
        raise SystemExit("port 8793 is Airflow's own log server port; pass another --port")


def wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"airflow standalone exited with {process.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/api/v2/monitor/health", timeout=5) as response:
                health = json.load(response)
            if all(part.get("status") == "healthy" for part in health.values() if isinstance(part, dict)):
                return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"Airflow did not become healthy within {timeout:.0f} s")


def wait_for_run(env: dict[str, str], run_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    state = "queued"
    while time.monotonic() < deadline:
        text = airflow(env, "dags", "list-runs", "seamless_align", "-o", "json")
        lines = [line for line in text.splitlines() if line.startswith("[{") or line.strip() == "[]"]
        runs = json.loads(lines[-1]) if lines else []  # the CLI prints log notices on stdout too
        state = next((r["state"] for r in runs if r["run_id"] == run_id), state)
        if state in ("success", "failed"):
            return state
        time.sleep(10)
    return state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "work")
    parser.add_argument("--project", type=Path, default=ROOT / "dags" / "seamless_project.example.yaml")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run")
    parser.add_argument("--exit-after", action="store_true", help="stop Airflow once the run finished")
    args = parser.parse_args()
    refuse_busy_port(args.port)
    work = args.work.resolve()
    (work / "airflow").mkdir(parents=True, exist_ok=True)
    env = environment(work, args.port, args.project.resolve())
    if shutil.which("airflow", path=env["PATH"]) is None:
        raise SystemExit("airflow is not installed in this environment: run `bash scripts/setup.sh worker,airflow`")
    log = open(work / "airflow" / "standalone.log", "ab")
    print(f"starting airflow standalone (AIRFLOW_HOME={env['AIRFLOW_HOME']}, log {log.name})", flush=True)
    process = subprocess.Popen(["airflow", "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_healthy(args.port, process)
        airflow(env, "pools", "set", "seamless_gpu", "2", "GPU steps of seamless_align (local twin: 2 at once)")
        deadline = time.monotonic() + 120
        while "seamless_align" not in airflow(env, "dags", "list", "-o", "plain"):
            if time.monotonic() > deadline:
                raise SystemExit("the dag processor did not load dags/seamless_align.py; see `airflow dags list-import-errors`")
            time.sleep(3)
        airflow(env, "dags", "unpause", "seamless_align")
        run_id = f"embedded__{time.strftime('%Y%m%dT%H%M%S')}"
        airflow(env, "dags", "trigger", "seamless_align", "--run-id", run_id)
        ui = f"http://localhost:{args.port}"
        print(f"triggered run {run_id}; follow it at {ui}/dags/seamless_align", flush=True)
        started = time.monotonic()
        state = wait_for_run(env, run_id, args.timeout)
        print(f"run {run_id}: {state} after {time.monotonic() - started:.0f} s", flush=True)
        import yaml

        from seamless_core.neuroglancer import viewer_link

        dst = str(yaml.safe_load(args.project.read_text())["destination"])  # relative: to the project file, as the DAG reads it
        dst = dst if "://" in dst else "file://" + str((args.project.parent / dst).resolve())
        root = str(work)
        print(f"Airflow UI: {ui}  (user admin; password in {env['AIRFLOW_HOME']}/simple_auth_manager_passwords.json.generated)")
        print(f"aligned image: {dst.rstrip('/')}/image; report: `seamless report --src <source> --dst {dst}`")
        print(f"view: run `seamless serve {root}` and open "
              + viewer_link([("aligned", f"{dst.rstrip('/')}/image")], serve_root=root))
        if state != "success":
            return 1
        if args.exit_after:
            return 0
        print("Airflow keeps running; Ctrl-C stops it.", flush=True)
        process.wait()
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
