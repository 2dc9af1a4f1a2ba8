"""The browser test: the embedded default's Airflow UI driven by Chromium, as a user would use it.

Starts `airflow standalone` the way scripts/embedded.py does (SQLite, LocalExecutor, dags/ and plugins/,
the local twin, the pool seamless_gpu with 2 slots) on a 2-section project (6 tasks with the default fuse: pairs), then in headless
Chromium (Debian's `chromium`, driven by Playwright): logs in as `admin` with the password Airflow wrote
under AIRFLOW_HOME (simple auth manager), opens the seamless_align DAG, opens the Trigger form, fills the
section range Params (First section, Stop section) and a run id, triggers (the form unpauses the DAG),
waits for the run to succeed (REST API), finds the run in the DAG's run list, opens it, checks its grid (task
groups expanded: a row per task of the plan with its label, and each of the run's cells says `State: Success`
in its tooltip), opens the task
that runs section 1's final render (`z=1 mip=2 compose + render`: the compose and its render share a
task under the default fuse; its label is read from the plan) from the run's task instances and checks that its log shows the step's progress lines
(`render: 1/1 chunks (100%), … chunks/s, … Mpx/s, ETA …` per chunk, then `render: done, …`;
seamless_core/progress.py, one line per chunk here since SEAMLESS_PROGRESS_INTERVAL=0), then opens
the same task's XCom tab and checks that it shows the steps' figures (`return_value`, operators.figures).

Screenshots (test artifacts): `test-artifacts/browser/` under the checkout (git-ignored; env
SEAMLESS_TEST_ARTIFACTS names another folder): 01-trigger-form.png (the section range filled),
02-trigger-run-id.png, 03-run-list.png, 04-run-grid.png, 05-task-log.png, 06-task-xcom.png, and failure.png + failure.html when a UI step
fails. The path is printed.

The browser: env SEAMLESS_CHROMIUM, else `chromium` / `chromium-browser` on PATH (scripts/test.sh installs
Debian's `chromium` through scripts/setup.sh's `browser` option when it runs as root or with sudo).
Without a browser or the playwright package the test FAILS with the reason; SEAMLESS_SKIP_BROWSER_TEST=1
turns that into a skip (an explicit opt-out, for machines that cannot install Chromium).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from seamless_core.block_runs import load_project
from seamless_core.plan import build_plan

pytest.importorskip("airflow.sdk", reason="needs the airflow extra (scripts/test.sh installs it)")

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "seamless_align"
SECTIONS, SIZE = 2, 256
RENDER_STEP = "z1.render"  # the final render of section 1: render + downsample; its task is looked up in the plan
PROGRESS = re.compile(r"render: \d+/\d+ chunks \(\d+%\), [\d.]+ chunks/s, [\d.]+ Mpx/s, ETA \d+:\d\d:\d\d")
DONE = re.compile(r"render: done, \d+ chunks, [\d.]+ Mpx in [\d.]+ s")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROJECT = """\
source: {source}
destination: {destination}
sections: {{start: 0, stop: {stop}}}
stages: serial
vote: {{k: 1}}
blocks: {{size: 2, decay_dist: 100}}
cpc: {{mip: 1, patch: 16}}
"""
OPT_OUT = "SEAMLESS_SKIP_BROWSER_TEST"


def _unavailable(reason: str) -> None:
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"{reason} ({OPT_OUT}=1)")
    pytest.fail(f"{reason}. Install it (`sudo bash scripts/setup.sh browser` installs Debian's chromium; "
                f"scripts/test.sh does when it runs as root), or set {OPT_OUT}=1 to skip this test.", pytrace=False)


def chromium() -> str:
    """The Chromium executable: env SEAMLESS_CHROMIUM, else Debian's `chromium` (or `chromium-browser`)."""
    named = os.environ.get("SEAMLESS_CHROMIUM")
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            _unavailable(f"SEAMLESS_CHROMIUM={named} is not an executable file")
        return named
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    _unavailable("Chromium not found (no SEAMLESS_CHROMIUM, no `chromium` or `chromium-browser` on PATH)")
    raise AssertionError  # unreachable


def artifacts() -> Path:
    folder = Path(os.environ.get("SEAMLESS_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.png"), *folder.glob("*.html")]:
        old.unlink()
    return folder


def _embedded():
    spec = importlib.util.spec_from_file_location("embedded", ROOT / "scripts" / "embedded.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


class Api:
    """Airflow's REST API as user admin (a JWT from /auth/token): only to wait for the run and read it."""

    def __init__(self, base: str, password: str) -> None:
        self.base = base
        self.token = self._call("/auth/token", {"username": "admin", "password": password})["access_token"]

    def _call(self, path: str, data: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if data is None:
            headers["Authorization"] = f"Bearer {self.token}"
        body = json.dumps(data).encode() if data is not None else None
        request = urllib.request.Request(self.base + path, body, headers, method="POST" if data else "GET")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def run(self, run_id: str) -> dict:
        return self._call(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")

    def wait(self, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        run = {"state": "missing"}
        while time.monotonic() < deadline:
            try:
                run = self.run(run_id)
            except urllib.error.HTTPError as error:
                if error.code != 404:
                    raise
            if run.get("state") in ("success", "failed"):
                return run
            time.sleep(5)
        return run


@pytest.mark.slow
def test_trigger_from_the_ui_and_read_the_progress_in_a_task_log(tmp_path: Path) -> None:
    executable = chromium()
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (the `test` extra has it)")
    shots = artifacts()
    print(f"browser test screenshots: {shots}")

    from workflow_helpers import deformed_stack

    started = time.monotonic()
    stack = deformed_stack(tmp_path, list(range(SECTIONS)), SIZE, max_translation=4.0, cracked=(), debris=())
    project = tmp_path / "project.yaml"
    project.write_text(PROJECT.format(source=stack.path, destination=tmp_path / "out", stop=SECTIONS))
    plan_tasks = build_plan(load_project(project)).tasks
    render_task = next(t for t in plan_tasks if RENDER_STEP in t.steps)
    embedded = _embedded()
    port = embedded.free_port()
    base = f"http://localhost:{port}"
    env = embedded.environment(tmp_path / "work", port, project)
    env.update({"SEAMLESS_PROGRESS_INTERVAL": "0",  # a progress line per chunk: what the test looks for
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2"})
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True)

    def airflow(*args: str) -> str:
        result = subprocess.run(["airflow", *args], env=env, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
        return result.stdout

    with open(home / "standalone.log", "wb") as log:
        standalone = subprocess.Popen(["airflow", "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
    phases: dict[str, float] = {}
    try:
        embedded.wait_healthy(port, standalone, timeout=300)
        airflow("pools", "set", "seamless_gpu", "2", "GPU steps")  # what the embedded default creates
        deadline = time.monotonic() + 180
        while DAG_ID not in airflow("dags", "list", "-o", "plain"):
            assert time.monotonic() < deadline, airflow("dags", "list-import-errors")[-3000:]
            time.sleep(3)
        phases["airflow up"] = time.monotonic() - started
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        api = Api(base, password)
        run_id = f"browser__{time.strftime('%Y%m%dT%H%M%S')}"

        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                tempfile.mkdtemp(prefix="chromium-", dir=tmp_path), executable_path=executable, headless=True,
                args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1800})
            page = context.new_page()
            page.set_default_timeout(60_000)  # 2 shared cores: the UI's first loads can be slow
            try:
                # log in (simple auth manager): any page sends to the login form first
                page.goto(f"{base}/dags/{DAG_ID}")
                page.get_by_label("Username").fill("admin")
                page.get_by_label("Password").fill(password)
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url(f"**/dags/{DAG_ID}")

                # the trigger form: the section range Params, then a run id under Advanced Options
                page.get_by_test_id("trigger-dag-button").click()
                form = page.get_by_role("dialog")
                expect(form).to_contain_text("Run Parameters")
                first, stop = form.get_by_label("First section"), form.get_by_label("Stop section (exclusive)")
                first.fill("0")
                stop.fill(str(SECTIONS))
                expect(first).to_have_value("0")
                expect(stop).to_have_value(str(SECTIONS))
                page.screenshot(path=shots / "01-trigger-form.png")
                form.get_by_role("button", name="Advanced Options").click()
                form.get_by_label("Run ID").fill(run_id)
                page.screenshot(path=shots / "02-trigger-run-id.png")
                form.get_by_test_id("trigger-dag-submit").click()
                page.wait_for_url(f"**/dags/{DAG_ID}/runs/{run_id}")
                phases["triggered"] = time.monotonic() - started

                run = api.wait(run_id, timeout=600)
                phases["run done"] = time.monotonic() - started
                assert run["state"] == "success", (run, _failed_logs(home))
                assert run["conf"]["section_start"] == 0 and run["conf"]["section_stop"] == SECTIONS, run["conf"]
                assert run["run_type"] == "manual"

                # the run in the DAG's run list, then its task instances, then one task's log
                page.goto(f"{base}/dags/{DAG_ID}/runs")
                row = page.get_by_role("row").filter(has_text=run_id)
                expect(row).to_contain_text("Success")
                page.screenshot(path=shots / "03-run-list.png")
                row.get_by_role("link", name=run_id, exact=True).click()
                page.wait_for_url(f"**/dags/{DAG_ID}/runs/{run_id}")
                # the grid beside it: every task of the plan a row (its label), every cell of this run Success
                page.get_by_role("button", name="Expand all task groups").click()
                for task in plan_tasks:
                    expect(page.get_by_test_id(f"task-{task.id.replace('.', '-')}")).to_contain_text(task.label)
                    page.get_by_test_id(f"grid-{run_id}-{task.id}").hover()
                    tooltip = page.get_by_role("tooltip").filter(has_text=task.id)
                    expect(tooltip).to_contain_text("State: Success")
                    page.mouse.move(0, 0)  # off the grid: the tooltip would cover the next cell
                    expect(tooltip).to_have_count(0)
                page.screenshot(path=shots / "04-run-grid.png")
                # the run's task instances (the table, not the grid's row of the same name)
                page.get_by_test_id("table-list").get_by_role("link", name=render_task.label, exact=True).click()
                page.wait_for_url(f"**/runs/{run_id}/tasks/{render_task.id}")
                logs = page.get_by_test_id("virtualized-list")
                expect(logs).to_contain_text(PROGRESS)
                expect(logs).to_contain_text(DONE)
                expect(logs).to_contain_text(re.compile(r"downsample: \d+/\d+ chunks \(\d+%\)"))
                page.screenshot(path=shots / "05-task-log.png")
                # the same task's XCom tab: the steps' figures (operators.figures)
                page.goto(f"{base}/dags/{DAG_ID}/runs/{run_id}/tasks/{render_task.id}/xcom")
                row = page.get_by_role("row").filter(has=page.get_by_test_id("table-cell-key").get_by_text(
                    "return_value", exact=True))
                expect(row).to_have_count(1)
                page.get_by_role("button", name="Expand all extra JSON").click()  # folded JSON until expanded
                expect(row.get_by_test_id("xcom-value")).to_contain_text("mpx_per_s")
                page.screenshot(path=shots / "06-task-xcom.png")
            except Exception:
                page.screenshot(path=shots / "failure.png")
                (shots / "failure.html").write_text(page.content())
                raise
            finally:
                context.close()
    finally:
        if standalone.poll() is None:
            os.killpg(standalone.pid, signal.SIGTERM)
            try:
                standalone.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(standalone.pid, signal.SIGKILL)
                standalone.wait()
    saved = sorted(p.name for p in shots.glob("*.png"))
    assert saved == ["01-trigger-form.png", "02-trigger-run-id.png", "03-run-list.png", "04-run-grid.png",
                     "05-task-log.png", "06-task-xcom.png"]
    print("browser test:", ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()),
          f"total {time.monotonic() - started:.0f} s; screenshots in {shots}")


def _failed_logs(home: Path) -> str:
    """The tail of the logs of failed tasks, for the assertion message."""
    tails = []
    for path in sorted((home / "logs").rglob("*.log")):
        text = path.read_text(errors="replace")
        if "exited with code" in text or "Traceback" in text:
            tails.append(f"--- {path}\n{text[-1500:]}")
    return "\n".join(tails[-4:])
