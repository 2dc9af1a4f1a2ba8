"""Issue #7, point 5: bad requests. Every project-config field, every DAG Param and the CLI's arguments,
fuzzed with hypothesis: each case either runs (validates, plans, or the step runs) or is refused with the
project's own clear error. Never another exception type, never a traceback in front of the user.

* **Project config** (`seamless_core.config`): mappings built field by field from plausible values, edge
  values and arbitrary JSON; each is validated (`parse_config`), checked against a real source layer
  (`check_against_source`), planned (`build_plan`), and also given to the real CLI as a YAML file
  (`seamless plan`). Accepted, or InputError / exit 3 with a message naming the file: nothing else.
* **DAG Params** (`dags/seamless_align.py` parsed by Airflow's DagBag): a run's conf with declared and
  undeclared keys and arbitrary values goes through Airflow's own Param processing (JSON-schema
  validation, the merge a task sees) and then through the task's run-time command line
  (`PlanStepRef.argv`, what the local twin and the pod operator run). Each conf is refused by Airflow
  (ParamValidationError naming the Param), refused by the DAG (AirflowFailException: fails the task
  without retries, with the reason), or gives the plan's argument list.
* **CLI**: command lines of the steps and workflow commands with fuzzed option values, run in-process
  through `seamless_core.cli.run_command` (what `seamless` runs) on a real tiny layer: exit 0, 2 (usage)
  or 3 (bad input) with a message; never 1 (internal: a traceback), never a traceback in the output.

Examples are derandomized (the same on every run) and bounded so the file runs in about a minute; the
last test prints the counts (docs/reliability.md) and checks that every fuzzer produced both outcomes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import types
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

os.environ.setdefault("AIRFLOW_HOME", "/tmp/seamless-test-airflow-home")

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_steps import make_layer

import seamless_core.cli_backfill  # noqa: F401  (`backfill`: seamless_core.cli registers it too)
from seamless_core.cli import main, run_command
from seamless_core.config import check_against_source, parse_config
from seamless_core.errors import ExitCode, InputError
from seamless_core.paths import normalise_path
from seamless_core.plan import build_plan

REPO = Path(__file__).resolve().parents[2]
COUNTS: Counter[str] = Counter()  # outcome counts, printed by the last test (docs/reliability.md)
FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
SIZE, SECTIONS, CHUNK = 64, 4, 32


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real tiny image layer (4 sections of 64 px, MIPs 0-2), an identity field over it, a scratch folder."""
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (SECTIONS, 1, SIZE, SIZE), dtype=np.uint8)
    make_layer(root / "src", data, chunk=CHUNK, max_mip=2)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["downsample", "--src", str(root / "src"), "--mip", "0", "--dst-mip", "2"]) == ExitCode.OK
        assert main(["compose", "--dst", str(root / "field"), "--z", "0", "--like", str(root / "src")]) == ExitCode.OK
        for z in range(1, SECTIONS):
            assert main(["compose", "--dst", str(root / "field"), "--z", str(z), "--like", str(root / "src")]) == 0
    project = root / "project.yaml"
    project.write_text(yaml.safe_dump({"source": str(root / "src"), "destination": str(root / "out"),
                                       "sections": {"start": 0, "stop": SECTIONS}, "stages": "serial",
                                       "blocks": {"size": 2}, "cpc": {"mip": 1, "patch": 8}, "fuse": "none"}))
    (root / "scratch").mkdir()
    return {"root": root, "src": root / "src", "field": root / "field", "project": project,
            "scratch": root / "scratch"}


# --- value strategies --------------------------------------------------------------------------------
JSON_LEAF = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
             | st.text(max_size=10))
JSONISH = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                       max_leaves=6)
SMALL_INT = st.integers(0, 6) | st.integers(-3, 12)
ANY_INT = SMALL_INT | st.integers(-(2**40), 2**40)
NUMBER = ANY_INT | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 0.5, 1.0, 1e-9, 1e9])


def maybe(strategy: st.SearchStrategy[Any], junk_weight: int = 1) -> st.SearchStrategy[Any]:
    """Mostly plausible values, sometimes arbitrary JSON."""
    return st.one_of(*([strategy] * 5), *([JSONISH] * junk_weight))


def sub(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """A nested mapping with a random subset of its fields (and sometimes an unknown one), or junk."""
    keys = st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields))

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out = {k: draw(fields[k]) for k in draw(keys)}
        if draw(st.integers(0, 9)) == 0:
            out[draw(st.text(min_size=1, max_size=6))] = draw(JSON_LEAF)
        return out

    return maybe(build())


ESTIMATOR = st.fixed_dictionaries(
    {"name": maybe(st.sampled_from(["block_matching", "finetuner", "pyramid", "optical_flow"]))},
    optional={"params": maybe(st.dictionaries(st.sampled_from(["iterations", "smoothness", "lr", "radius", "model",
                                                                "window", "bogus"]), NUMBER | st.text(max_size=5),
                                              max_size=2))})
STAGE = st.fixed_dictionaries({"mip": maybe(st.integers(-1, 13)), "estimators": maybe(st.lists(ESTIMATOR, max_size=2))})


def config_fields(world: dict[str, Path]) -> dict[str, st.SearchStrategy[Any]]:
    src, root = str(world["src"]), world["root"]
    paths = st.sampled_from([src, f"file://{src}", "gs://bucket/em", "s3://bucket/em", "ftp://host/x", "", "relative/x",
                             str(root / "nowhere"), f"{src}/sub", str(root)])
    return {
        "source": maybe(paths),
        "destination": maybe(st.builds(lambda n: str(root / "dst" / n), st.text("abc", min_size=1, max_size=3)) | paths),
        "mask": maybe(st.none() | paths),
        "bbox": maybe(st.none() | st.lists(st.integers(-10, 80), min_size=3, max_size=5)),
        "sections": sub({"start": maybe(SMALL_INT), "stop": maybe(SMALL_INT)}),
        "bad_sections": maybe(st.lists(SMALL_INT, max_size=3)),
        "stages": maybe(st.sampled_from(["exact", "serial", "serial-fine", "fast", ""]) | st.lists(STAGE, max_size=3)),
        "vote": sub({"k": maybe(SMALL_INT), "temperature": maybe(NUMBER), "blur": maybe(NUMBER)}),
        "blocks": sub({"size": maybe(SMALL_INT), "decay_dist": maybe(ANY_INT)}),
        "render": sub({"mip": maybe(SMALL_INT), "chunk": maybe(st.none() | st.sampled_from([0, 16, 32, 64, 48]))}),
        "cpc": sub({"mip": maybe(SMALL_INT), "patch": maybe(st.sampled_from([0, 3, 4, 8, 16, 33]) | ANY_INT)}),
        "chunk": maybe(st.none() | st.sampled_from([0, 1, 16, 32, 64, 48]) | ANY_INT),
        "pad": maybe(ANY_INT),
        "batch": maybe(st.integers(-1, 300)),
        "granularity": maybe(st.sampled_from(["stage", "section", "block"])),
        "device": maybe(st.sampled_from(["cpu", "auto", "cuda", "cuda:0", "cuda:x", "gpu", "CPU", ""])),
        "fill_missing": maybe(st.booleans() | st.sampled_from(["yes", "no", 0, 1])),
        "resources": sub({"gpu": maybe(SMALL_INT), "cpu": maybe(st.sampled_from(["4", "500m", "x"])),
                          "memory": maybe(st.sampled_from(["16Gi", "1e3", "lots"]))}),
    }


@st.composite
def configs(draw: st.DrawFn, world: dict[str, Path]) -> Any:
    fields = config_fields(world)
    if draw(st.integers(0, 30)) == 0:
        return draw(JSONISH)  # not even a mapping
    base = {"source": str(world["src"]), "destination": str(world["root"] / "dst" / "base"),
            "sections": {"start": 0, "stop": SECTIONS}, "stages": "serial", "blocks": {"size": 2},
            "cpc": {"mip": 1, "patch": 8}}
    for key in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, min_size=1, max_size=4)):
        base[key] = draw(fields[key])
    for key in draw(st.lists(st.sampled_from(sorted(base)), unique=True, max_size=1)):
        del base[key]
    if draw(st.integers(0, 15)) == 0:
        base[draw(st.sampled_from(["blok_size", "Source", "k", "sections_stop"]))] = 3
    return base


def quiet_run(argv: list[str]) -> tuple[int, str]:
    """`seamless ARGV` in-process, as the console entry runs it; returns its exit code and all it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code, _ = run_command([str(a) for a in argv])
    return code, out.getvalue() + err.getvalue()


def clean_refusal(code: int, output: str, what: object) -> None:
    """The contract of a refused request: a documented exit code and a message, never a traceback."""
    assert code in (ExitCode.USAGE, ExitCode.INVALID_INPUT), (what, code, output[-3000:])
    assert "Traceback" not in output, (what, output[-3000:])
    assert output.strip(), (what, "refused without a message")


# --- 1. the project config ---------------------------------------------------------------------------
def test_every_project_config_is_accepted_or_refused_with_a_clear_message(world) -> None:
    @settings(FUZZ, max_examples=250)
    @given(data=configs(world))
    def check(data: Any) -> None:
        try:
            config = parse_config(data, "fuzz.yaml")
        except InputError as exc:
            message = str(exc)
            assert message.startswith("fuzz.yaml") and "Traceback" not in message, message
            if isinstance(data, dict):
                assert "\n  - " in message, message  # one line per problem, with its key path
            COUNTS["config: refused by validation"] += 1
            return
        if any(p and p.startswith(("gs://", "s3://")) for p in (config.source, config.mask)):
            COUNTS["config: accepted (remote layers, not opened: no network here)"] += 1
            return
        try:
            check_against_source(config)
        except InputError as exc:
            assert str(exc), data
            COUNTS["config: refused by the source check"] += 1
            return
        plan = build_plan(config)
        assert plan.steps and all(isinstance(a, str) for s in plan.steps for a in plan.argv(s)), data
        COUNTS["config: accepted and planned"] += 1

    check()


def test_every_project_file_through_the_cli_plans_or_exits_3(world) -> None:
    folder = world["scratch"] / "projects"
    folder.mkdir()

    @settings(FUZZ, max_examples=80)
    @given(data=configs(world), text=st.none() | st.text(max_size=30))
    def check(data: Any, text: str | None) -> None:
        remote = isinstance(data, dict) and any(isinstance(data.get(k), str) and data[k].startswith(("gs://", "s3://"))
                                                for k in ("source", "mask"))
        assume(text is not None or not remote)  # `plan` opens the source: no network here
        path = folder / f"{uuid.uuid4().hex}.yaml"
        try:
            path.write_text(text if text is not None else yaml.safe_dump(data, allow_unicode=True))
        except UnicodeEncodeError:  # lone surrogates: not a file anyone can write
            return
        code, output = quiet_run(["plan", path])
        if code == ExitCode.OK:
            assert "steps over sections" in output, output
            COUNTS["project file: planned by `seamless plan`"] += 1
        else:
            clean_refusal(code, output, data if text is None else text)
            COUNTS["project file: refused by `seamless plan`"] += 1

    check()


# --- 2. the DAG's Params -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dag(world):
    pytest.importorskip("airflow.sdk", reason="needs the airflow extra (scripts/test.sh installs it)")
    from airflow.dag_processing.dagbag import DagBag

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEAMLESS_PROJECT", str(world["project"]))
        mp.setenv("SEAMLESS_EXECUTOR", "local")
        bag = DagBag(dag_folder=str(REPO / "dags" / "seamless_align.py"), known_pools={"default_pool", "seamless_gpu"})
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["seamless_align"]


PARAM_VALUES = {
    "source": maybe(st.sampled_from(["", "gs://lab/em", "s3://b/x", "ftp://x/y", "rel/path", "/abs/elsewhere"])),
    "destination": maybe(st.sampled_from(["", "gs://lab/aligned", "/tmp/seamless-fuzz-out", "ftp://x", "x"])),
    "section_start": maybe(st.sampled_from([0, 1, 2, -1, 1.0, 2**63])),
    "section_stop": maybe(st.sampled_from([4, 3, 0, 5, 4.0, 10**12])),
    "stages": maybe(st.sampled_from(["exact", "serial", "serial-fine", "project", "fast", ""])),
    "block_size": maybe(st.sampled_from([2, 3, 1, 0, 2.0])),
    "k": maybe(st.sampled_from([1, 3, 2, 0, 15, 16])),
    "decay_dist": maybe(st.sampled_from([1, 100, 0, -5, 10**9])),
    "chunk": maybe(st.sampled_from([None, 0, 16, 32, 48, 64, 1, -32, 32.0])),
    "device": maybe(st.sampled_from(["cpu", "cuda", "auto", "gpu", "", "cuda:1"])),
    # not declared as Params, yet read from a run's conf by the operators (operators.local.apply_params)
    "mask": maybe(st.sampled_from([None, "", "gs://lab/defects", "ftp://x"])),
    "fill_missing": maybe(st.sampled_from([None, True, False, "no", "yes", 0, 1])),
}
CONFS = st.fixed_dictionaries({}, optional=PARAM_VALUES) | st.dictionaries(st.text(max_size=8), JSON_LEAF, max_size=3)


def test_every_run_conf_is_refused_by_airflow_or_the_dag_or_runs_the_plan(dag) -> None:
    from airflow.sdk.definitions.param import process_params
    from airflow.sdk.exceptions import AirflowFailException, ParamValidationError

    tasks = [dag.task_dict[t] for t in ("b000.z0.start", "z1.t1.compute_field", "z1.vote", "b001.stitch",
                                         "z3.compose", "z3.render", "z3.cpc", "z1.cpc_source")]
    params_before = dag.params.dump()

    @settings(FUZZ, max_examples=200)
    @given(conf=CONFS, which=st.integers(0, len(tasks) - 1))
    def check(conf: dict[str, Any], which: int) -> None:
        task = tasks[which]
        try:  # what Airflow does with a run's conf for every task: merge into the DAG's Params, validate
            # (on a copy: process_params resolves the conf into the DAG's own Param objects, harmless in a
            # task's process, not in a test that shares the parsed DAG)
            params = process_params(types.SimpleNamespace(params=copy.deepcopy(dag.params)), task, conf,
                                    suppress_exception=False)
        except ParamValidationError as exc:
            assert "Invalid input for param" in str(exc), exc
            COUNTS["Params: refused by Airflow's Param validation"] += 1
            return
        try:  # what the task's operator does with them when it runs (local twin and pod alike)
            argv = task.plan_ref.argv(params)
        except AirflowFailException as exc:
            assert str(exc) and "Traceback" not in str(exc), exc
            COUNTS["Params: refused by the DAG (task fails, no retry)"] += 1
            return
        assert argv[0] == "--marker" and all(isinstance(a, str) for a in argv), argv
        # accepted means taken as given: the run writes where its Params say, with the device and flag they say
        if params.get("destination"):
            assert argv[1].startswith(normalise_path(params["destination"]).rstrip("/") + "/.seamless/"), (conf, argv)
        if params.get("device") and "--device" in argv:
            assert argv[argv.index("--device") + 1] == params["device"], (conf, argv)
        if params.get("fill_missing") is not None:
            assert isinstance(params["fill_missing"], bool), ("a non-boolean fill_missing was accepted", conf)
        COUNTS["Params: accepted (the plan's command line)"] += 1

    try:
        check()
    finally:
        assert dag.params.dump() == params_before  # the fuzz never changed the parsed DAG's Params


# --- 3. the CLI --------------------------------------------------------------------------------------
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
INT_TEXT = st.one_of(*[st.integers(0, 3).map(str)] * 6, st.integers(-2, 6).map(str), st.integers(-(2**40), 2**40).map(str), TEXT,
                     st.sampled_from(["1.5", "0x10", "1e3", " 2", "inf", "nan"]))
Z_TEXT = st.one_of(*[st.integers(0, 3).map(lambda z: f"{z}:{z + 1}")] * 4,
                   st.tuples(st.integers(-2, 6), st.integers(-2, 6)).map(lambda t: f"{t[0]}:{t[1]}"), TEXT,
                   st.sampled_from(["0:1", "1:3", "3:1", "0:99", ":", "1:", "a:b", "0:1:2"]))
BBOX_TEXT = st.one_of(
    st.tuples(*[st.integers(-40, 100)] * 6).map(lambda v: f"{v[0]},{v[1]},{v[2]}:{v[3]},{v[4]},{v[5]}"),
    *[st.tuples(st.sampled_from([0, 32]), st.integers(0, 3)).map(lambda t: f"{t[0]},0,{t[1]}:64,64,{t[1] + 1}")] * 4,
    TEXT, st.sampled_from(["0,0,0:64,64", "0,0:1,1", "0,0,0:32,32,1", "0,0,0:0,0,1"]))
STAGES_TEXT = st.one_of(st.sampled_from(["exact", "serial", "serial-fine", "fast", "", "[]", "{}", "null", "3"]),
                        st.lists(STAGE, max_size=2).map(lambda s: json.dumps(s, default=str)), TEXT)


def options(spec: dict[str, st.SearchStrategy[str] | None]) -> st.SearchStrategy[list[str]]:
    """A random subset of a command's options, each with a fuzzed value (None: a flag)."""
    if not spec:
        return st.just([])
    return st.lists(st.sampled_from(sorted(spec)), unique=True, max_size=3).flatmap(
        lambda keys: st.tuples(*[st.just([k]) if spec[k] is None else spec[k].map(lambda v, k=k: [k, v]) for k in keys])
    ).map(lambda parts: [a for p in parts for a in p])


def command_lines(world: dict[str, Path]) -> st.SearchStrategy[list[str]]:
    src, field, project = str(world["src"]), str(world["field"]), str(world["project"])
    layer = st.sampled_from([src, f"file://{src}", str(world["root"] / "nowhere"), "", "ftp://x/y"])
    common = {"--mip": INT_TEXT, "--bbox": BBOX_TEXT, "--bbox-mip": INT_TEXT, "--z": Z_TEXT, "--chunk": INT_TEXT,
              "--device": st.sampled_from(["cpu", "auto", "cuda", "gpu", ""])}

    def out() -> st.SearchStrategy[str]:
        return st.builds(lambda: str(world["scratch"] / uuid.uuid4().hex))

    def cmd(name: str, fixed: st.SearchStrategy[list[str]], spec: dict[str, st.SearchStrategy[str] | None]):
        return st.tuples(fixed, options(spec)).map(lambda t: [name, *t[0], *t[1]])

    return st.one_of(
        cmd("copy", st.tuples(layer, out()).map(lambda t: ["--src", t[0], "--dst", t[1]]),
            {**common, "--kind": st.sampled_from(["image", "field", "mask", "x"]), "--downsample-to": INT_TEXT,
             "--fill-missing": None}),
        cmd("downsample", st.just(["--src", "<copy>"]),
            {**common, "--dst-mip": INT_TEXT, "--kind": st.sampled_from(["image", "mask", "field", "quality"]),
             "--mask-rule": st.sampled_from(["max", "mode", "min"])}),
        cmd("cpc", st.tuples(layer, out()).map(lambda t: ["--src", t[0], "--dst", t[1]]),
            {**common, "--patch": INT_TEXT, "--offset": INT_TEXT, "--fill-missing": None}),
        cmd("render", st.tuples(layer, out()).map(lambda t: ["--src", t[0], "--field", field, "--dst", t[1]]),
            {**common, "--field-mip": INT_TEXT, "--max-reach": INT_TEXT, "--downsample-to": INT_TEXT,
             "--mask": st.sampled_from([src, field, "nowhere"]), "--mask-mip": INT_TEXT}),
        cmd("compose", out().map(lambda d: ["--dst", d]),
            {"--z": INT_TEXT, "--like": layer, "--field": st.sampled_from([field, src, "nowhere"]), "--at": INT_TEXT,
             "--weight": st.sampled_from(["0.5", "1", "-1", "2", "nan", "x"]), "--mip": INT_TEXT,
             "--bbox": BBOX_TEXT, "--max-reach": INT_TEXT}),
        cmd("compute-field", st.tuples(out(), st.integers(0, 4)).map(
            lambda t: ["--src", src, "--tgt", src, "--dst", t[0], "--z", str(t[1]), "--stages", "serial"]),
            {"--offset": INT_TEXT, "--tgt-z": INT_TEXT, "--stages": STAGES_TEXT, "--pad": INT_TEXT,
             "--stage-range": Z_TEXT, "--on-empty-target": st.sampled_from(["error", "init", "skip"]),
             "--batch": INT_TEXT, "--chunk": INT_TEXT, "--bbox": BBOX_TEXT, "--fill-missing": None}),
        cmd("vote", st.tuples(out(), out(), st.sampled_from([1, 2, 3])).map(
            lambda t: ["--dst", t[0], "--agreement", t[1], *["--field", field] * t[2], "--z", "1"]),
            {"--field": st.sampled_from([field, src, "nowhere"]), "--z": INT_TEXT, "--mip": INT_TEXT,
             "--temperature": st.sampled_from(["1", "0", "-1", "nan", "inf", "x"]),
             "--blur": st.sampled_from(["2", "0", "-1", "nan", "x"]), "--bbox": BBOX_TEXT}),
        cmd("plan", st.just([project]), {"--z": Z_TEXT, "--json": None}),
        cmd("backfill", st.just([project, "--print-only"]),
            {"--z": Z_TEXT, "--reprocess": st.sampled_from(["none", "failed", "completed", "all"]),
             "--max-active-runs": INT_TEXT, "--dag-id": TEXT}),
        cmd("info", layer.map(lambda p: [p]), {}),
        cmd("init", st.tuples(layer, out()).map(lambda t: ["--src", t[0], "--dst", t[1]]), {}),
        st.tuples(st.sampled_from(["--marker", "--upstream"]), TEXT, st.lists(
            st.sampled_from(["--marker", "--upstream", "info", src, "x", "--z"]), max_size=3)).map(
            lambda t: [t[0], t[1], *t[2]]),
        st.lists(st.sampled_from(["copy", "render", "--src", "--dst", src, "--z", "0:1", "--mip", "x", "--help2",
                                  "align", "vote", "-", "--"]), max_size=5),
    )


def test_every_command_line_runs_or_exits_2_or_3_without_a_traceback(world) -> None:
    @settings(FUZZ, max_examples=220)
    @given(argv=command_lines(world))
    def check(argv: list[str]) -> None:
        if argv[:1] == ["downsample"]:  # it writes MIPs in place: each example gets its own copy of the source
            copy = world["scratch"] / uuid.uuid4().hex
            shutil.copytree(world["src"], copy)
            argv = [str(copy) if a == "<copy>" else a for a in argv]
        code, output = quiet_run(argv)
        what = argv[0] if argv and not argv[0].startswith("--") else ("marker options" if argv else "nothing")
        if code == ExitCode.OK:
            assert "Traceback" not in output, (argv, output[-3000:])
            COUNTS[f"CLI: ran ({what})"] += 1
        else:
            clean_refusal(code, output, argv)
            COUNTS[f"CLI: refused, exit {code} ({what})"] += 1

    check()


def test_fuzz_counts() -> None:
    """The figures of docs/reliability.md, and proof that each fuzzer reached both outcomes."""
    for line in sorted(COUNTS.items()):
        print(f"{line[1]:5d}  {line[0]}")
    kinds = {"config": ("accepted", "refused"), "project file": ("planned", "refused"),
             "Params": ("accepted", "refused"), "CLI": ("ran", "refused")}
    ran = [kind for kind in kinds if any(k.startswith(f"{kind}: ") for k in COUNTS)]
    if not ran:
        pytest.skip("no fuzzer ran in this session (run the whole file)")
    for kind in ran:
        for outcome in kinds[kind]:
            assert any(k.startswith(f"{kind}: {outcome}") for k in COUNTS), (kind, outcome, dict(COUNTS))
