"""SeamlessLocalOperator, the local twin of SeamlessPodOperator, and the factory the DAG uses.

Both operators run the very same `seamless` argument list (restart-marker options, then the step's
subcommand): in a pod on Kubernetes, or here as a child process of the Airflow worker (the embedded
default: Airflow standalone, LocalExecutor, file:// layers). Which one a DAG uses is one setting
(`executor()`): env SEAMLESS_EXECUTOR, else the Airflow Variable `seamless_executor`, `local` by default.

The DAG's tasks are fixed when its file is parsed (from the project YAML); a DAG run's Params may still
change what does not change the task structure (paths, chunk, device...). `PlanStepRef` re-derives a
task's command line from the run's Params when it runs and refuses a run whose Params would change the
structure (another section range, block size, k, ...), naming the Params at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import deque
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from .figures import StepFigures
from .links import NeuroglancerLink
from .settings import ENV_VARIABLE as SETTINGS_ENV
from .step_args import checked_step, with_retry_defaults

if TYPE_CHECKING:
    from seamless_core.plan import Plan, Step, Task
    from seamless_core.warm import WarmProcess

EXECUTOR_ENV = "SEAMLESS_EXECUTOR"
EXECUTOR_VARIABLE = "seamless_executor"
LEGACY_EXECUTOR_ENV = "SEAMLESS_EXECUTION"  # named by operators.settings' error message; same values
EXECUTORS = ("local", "kubernetes")
GPU_POOL_ENV = "SEAMLESS_GPU_POOL"
DEFAULT_GPU_POOL = "seamless_gpu"
NOT_RETRIED = {2: "bad command line", 3: "bad input"}  # retrying cannot help: fail the task at once
EXIT_MEANING = {1: "internal error", 4: "storage error (retried)", 130: "interrupted", -9: "killed", -15: "terminated",
                -1: "hung up, or its warm step server died"}


# --- which operator --------------------------------------------------------------------------------
def executor() -> str:
    """`local` or `kubernetes`: env SEAMLESS_EXECUTOR (or SEAMLESS_EXECUTION), else the Variable."""
    value = os.environ.get(EXECUTOR_ENV) or os.environ.get(LEGACY_EXECUTOR_ENV)
    if not value:
        try:  # env AIRFLOW_VAR_SEAMLESS_EXECUTOR or the metadata DB; never fatal at parse time
            from airflow.sdk import Variable

            value = Variable.get(EXECUTOR_VARIABLE, default="local")
        except Exception:  # noqa: BLE001 - no API/DB reachable (tests, a bare parse): the default
            value = "local"
    value = str(value).strip().lower()
    if value not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}/{EXECUTOR_VARIABLE} is {value!r}: use one of {', '.join(EXECUTORS)}")
    return value


def gpu_pool() -> str:
    """The Airflow pool of GPU steps: env SEAMLESS_GPU_POOL, else the chart's `airflow_pool` setting
    (the pool its Job creates), else `seamless_gpu`. It must exist: `airflow pools set`."""
    if os.environ.get(GPU_POOL_ENV):
        return os.environ[GPU_POOL_ENV]
    raw = os.environ.get(SETTINGS_ENV)  # the chart's ConfigMap, as JSON
    if raw:
        try:
            pool = json.loads(raw).get("airflow_pool")
        except (ValueError, AttributeError):  # malformed settings fail later, naming the key, in load_settings
            pool = None
        if isinstance(pool, str) and pool:
            return pool
    return DEFAULT_GPU_POOL


# --- run-time command lines from the run's Params ------------------------------------------------
def structure_key(plan: Plan) -> str:
    """A hash of the plan's task structure: task ids, their steps and dependencies, nothing else."""
    text = ";".join(f"{task.id}={','.join(task.steps)}<{','.join(task.deps)}" for task in plan.tasks)
    return hashlib.sha256(text.encode()).hexdigest()


def _param_int(name: str, value: Any) -> int:
    """An integer Param (or conf key); anything else is refused naming it (JSON numbers like 32.0 pass)."""
    from seamless_core.errors import InputError

    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"Param {name} must be an integer, got {value!r}")
    try:
        number = float(value) if isinstance(value, float) else int(value)
    except ValueError:
        raise InputError(f"Param {name} must be an integer, got {value!r}") from None
    if isinstance(number, float) and not number.is_integer():
        raise InputError(f"Param {name} must be an integer, got {value!r}")
    return int(number)


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The project config with a run's Params laid over it (the Params of dags/seamless_align.py).

    Values of the wrong type (a run's conf may carry keys the Params form does not declare, such as
    `mask` and `fill_missing`) raise an InputError naming the Param, never a bare TypeError/ValueError.
    """
    import copy

    from seamless_core.errors import InputError

    config = copy.deepcopy(base)
    get = params.get
    for key in ("source", "destination", "device", "mask"):
        if get(key) not in (None, ""):
            config[key] = get(key)
    if get("chunk") not in (None, "", 0):
        config["chunk"] = _param_int("chunk", get("chunk"))
    if get("fill_missing") is not None:
        if not isinstance(get("fill_missing"), bool):
            raise InputError(f"Param fill_missing must be true or false, got {get('fill_missing')!r}")
        config["fill_missing"] = get("fill_missing")
    if get("stages") not in (None, "", "project"):
        config["stages"] = get("stages")
    if get("fuse") not in (None, ""):
        config["fuse"] = get("fuse")
    sections = dict(config.get("sections", {}))
    for key in ("start", "stop"):
        if get(f"section_{key}") is not None:
            sections[key] = _param_int(f"section_{key}", get(f"section_{key}"))
    config["sections"] = sections
    blocks = dict(config.get("blocks") or {})
    for key, name in (("size", "block_size"), ("decay_dist", "decay_dist")):
        if get(name) is not None:
            blocks[key] = _param_int(name, get(name))
    config["blocks"] = blocks
    vote = dict(config.get("vote") or {})
    if get("k") is not None:
        vote["k"] = _param_int("k", get("k"))
    config["vote"] = vote
    return config


@lru_cache(maxsize=8)
def _plan_for(config_json: str, origin: str) -> Plan:
    import json

    from seamless_core.config import parse_config
    from seamless_core.plan import build_plan

    return build_plan(parse_config(json.loads(config_json), origin))


class PlanStepRef:
    """Which plan task (one step, or steps fused: `Plan.tasks`) a task runs and the project it came from;
    resolves its argv at run time."""

    def __init__(self, base: dict[str, Any], origin: str, step_id: str, structure: str) -> None:
        self.base, self.origin, self.step_id, self.structure = base, origin, step_id, structure

    def argv(self, params: dict[str, Any] | None) -> list[str]:
        import json

        from seamless_core.errors import InputError

        try:
            config = apply_params(self.base, dict(params or {}))
            plan = _plan_for(json.dumps(config, sort_keys=True, default=str), f"{self.origin} with this run's Params")
        except InputError as exc:
            raise AirflowFailException(str(exc)) from None
        if structure_key(plan) != self.structure:
            changed = sorted(k for k, v in config.items() if self.base.get(k) != v)
            raise AirflowFailException(
                f"this run's Params change the DAG's task structure (changed: {', '.join(changed) or 'none'}): the "
                f"tasks are fixed when the DAG file is parsed, from the project YAML {self.origin}. Edit that file "
                "(or point SEAMLESS_PROJECT at another) for another section range, block size, k, decay_dist, stages "
                "or fuse"
            )
        return plan.task_argv(plan.task_by_id[self.step_id])


class _Planned:
    """Mixin: `step` is the parse-time argv; with a plan_ref it is re-derived from the run's Params."""

    plan_ref: PlanStepRef | None = None

    def resolved_step(self, context: Any) -> list[str]:
        if self.plan_ref is None:
            return list(self.step)  # type: ignore[attr-defined]
        params = context.get("params") if hasattr(context, "get") else None
        return self.plan_ref.argv(params)


# --- the local twin ------------------------------------------------------------------------------
class SeamlessLocalOperator(_Planned, BaseOperator):
    """Run `python -m seamless_core <step>` as a child process of the worker; its output goes to the task log.

    The step is an argument list, never a shell string. Exit codes (docs/cli.md): 2 (usage) and 3 (bad
    input) fail the task without retries (AirflowFailException); anything else nonzero (4: storage) is a
    normal failure, so the task's retries apply. on_kill terminates the child's process group (SIGTERM:
    `seamless` keeps finished chunks and exits 130; SIGKILL after `kill_grace`).

    With `warm` (default: env SEAMLESS_WARM, on unless "0") the child is forked by a warm step server
    that has torch and the steps imported already (seamless_core.warm): ~0.2 s to the first chunk, not
    ~3 s. Same argv, environment, output and exit codes; any failure to reach the server falls back
    to a subprocess.
    """

    template_fields = ()
    ui_color = "#d8e8f8"
    operator_extra_links = (NeuroglancerLink(),)

    def __init__(self, *, step: list[str], pool_kind: str = "gpu", plan_ref: PlanStepRef | None = None,
                 kill_grace: float = 30.0, env: dict[str, str] | None = None, warm: bool | None = None,
                 **kwargs: Any) -> None:
        step = checked_step(step)
        with_retry_defaults(kwargs, retries=2)
        super().__init__(**kwargs)
        self.step = list(step)
        self.pool_kind = pool_kind
        self.plan_ref = plan_ref
        self.kill_grace = kill_grace
        self.env = env
        self.warm = warm
        self._proc: subprocess.Popen[str] | WarmProcess | None = None

    def command(self, argv: list[str]) -> list[str]:
        return [sys.executable, "-m", "seamless_core", *argv]

    def execute(self, context: Any) -> dict[str, Any] | None:
        """Run the step; return its figures (operators.figures), which Airflow keeps as the task's XCom."""
        argv = self.resolved_step(context)
        cmd = self.command(argv)
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        tail: deque[str] = deque(maxlen=20)
        figures = StepFigures()
        from seamless_core import warm

        proc: subprocess.Popen[str] | WarmProcess | None = None
        if self.warm if self.warm is not None else warm.enabled(env):
            proc = warm.popen(argv, env)
        if proc is not None:
            self.log.info("running (warm step server, pid %d): %s", proc.pid, subprocess.list2cmdline(cmd))
        else:
            self.log.info("running: %s", subprocess.list2cmdline(cmd))
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                bufsize=1, env=env, start_new_session=True,  # its own process group: on_kill reaches its children
            )
        self._proc = proc
        assert proc.stdout is not None
        for line in proc.stdout:  # streamed as they come, stdout and stderr in order
            line = line.rstrip("\n")
            tail.append(line)
            figures.feed(line)
            self.log.info("%s", line)
        proc.stdout.close()
        code = proc.wait()
        self._proc = None
        if code == 0:
            return figures.xcom()
        last = next((t for t in reversed(tail) if t.strip()), "")
        meaning = NOT_RETRIED.get(code) or EXIT_MEANING.get(code, "failed")
        message = f"seamless {self.subcommand(argv) or argv[0]} exited with code {code} ({meaning}): {last}"
        if code in NOT_RETRIED:
            raise AirflowFailException(message)
        raise AirflowException(message)

    @staticmethod
    def subcommand(argv: list[str]) -> str | None:
        """The subcommand after the global marker options (`--marker X --upstream Y ... render ...`)."""
        i = 0
        while i < len(argv) and argv[i] in ("--marker", "--upstream", "--force"):
            i += 1 if argv[i] == "--force" else 2
        return argv[i] if i < len(argv) else None

    def on_kill(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self.log.info("killing seamless (pid %s) and its process group", proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=self.kill_grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


# --- the factory ---------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _pod_class() -> type:
    """SeamlessPodOperator with run-time Params (imported only when the DAG runs on Kubernetes)."""
    from .pod import SeamlessPodOperator

    class PlannedPodOperator(_Planned, SeamlessPodOperator):
        def __init__(self, *, plan_ref: PlanStepRef | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.plan_ref = plan_ref

        def execute(self, context: Any) -> Any:
            self.arguments = self.resolved_step(context)
            return super().execute(context)

    return PlannedPodOperator


def step_operator(step: Step | Task, plan: Plan, *, kind: str | None = None, plan_ref: PlanStepRef | None = None,
                  priorities: dict[str, int] | None = None, pool: str | None = None, **kwargs: Any) -> BaseOperator:
    """The task for one plan step or one plan task (`Plan.tasks`: steps fused by `fuse`): task id = its id,
    display name = its label, absolute priority; a task runs its steps' command lines joined by `--then`.

    `kind` is `local` or `kubernetes` (default: `executor()`); GPU steps go to the GPU pool (`gpu_pool()`)
    and, on Kubernetes, to the GPU node pool; the others to the CPU node pool and Airflow's default pool.
    """
    kind = kind or executor()
    fused = hasattr(step, "steps")  # a plan Task
    if priorities is None:
        priorities = plan.task_priorities() if fused else plan.priorities()
    if step.gpu:
        kwargs.setdefault("pool", pool or gpu_pool())
    argv = plan.task_argv(step) if fused else plan.argv(step)  # type: ignore[arg-type]
    common = dict(task_id=step.id, task_display_name=step.label, step=argv,
                  pool_kind="gpu" if step.gpu else "cpu", priority_weight=priorities[step.id],
                  weight_rule="absolute", plan_ref=plan_ref, **kwargs)
    if kind == "local":
        return SeamlessLocalOperator(**common)
    if kind == "kubernetes":
        return _pod_class()(**common)
    raise ValueError(f"unknown executor {kind!r}: use one of {', '.join(EXECUTORS)}")
