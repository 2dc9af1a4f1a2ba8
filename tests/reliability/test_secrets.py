"""Issue #7, point 6: secrets. Fake credential values, unique per test run, placed where users put them:

* GOOGLE_APPLICATION_CREDENTIALS naming a service-account JSON key file;
* CloudVolume's own files, $HOME/.cloudvolume/secrets/google-secret.json and aws-secret.json (where the Helm
  chart projects the Kubernetes Secrets `secrets.gcs` / `secrets.aws` in a task pod);
* AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN in the environment of Airflow and its tasks.

Then a full run, `airflow dags test seamless_align` with the local twin (a real Airflow with its SQLite
metadata DB, every task a `python -m seamless_core` child that inherits that environment), and a scan for
every credential value (and its base64 and JSON-escaped forms) in: the task logs and the run's console
output, every table of the metadata DB (XComs, the run's conf and the DAG's Params, rendered fields, the
serialized DAG, the log table; zlib-compressed columns decompressed), every file the run wrote (layers,
restart markers, step reports), and the pod spec the real KubernetesPodOperator renders for every step kind
with the Helm chart's settings (both Secrets enabled) while those values sit in its process environment.
None may appear.

Pods: every pod runs as non-root (runAsNonRoot, uid > 0) with a read-only root filesystem, no privilege
escalation, all capabilities dropped, /tmp and /dev/shm as emptyDirs. That the steps allow a read-only
root filesystem is checked on the same full run: an audit hook (sys.addaudithook, loaded into every
`seamless` child through PYTHONPATH) records each file the step opens for writing, creates, renames or
deletes; every one must lie in the destination (remote storage in a pod), TMPDIR or /dev/shm. The run covers
every subcommand a plan step uses (copy, compute-field, vote, compose, render with its pyramid, cpc); the
stitch is a copy and the block render a render.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import sqlite3
import subprocess
import sys
import types
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("AIRFLOW_HOME", "/tmp/seamless-test-airflow-home")
pytest.importorskip("airflow.providers.cncf.kubernetes", reason="needs the airflow extra (scripts/test.sh installs it)")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "deploy"))
from deploy_helpers import dag_settings, k8s_validate, render

SIZE = 256
PROJECT = """\
source: {source}
destination: {destination}
sections: {{start: 0, stop: 2}}
stages: serial
pad: 16
blocks: {{size: 2, decay_dist: 100}}
cpc: {{mip: 1, patch: 16}}
fuse: none
"""
# Loaded by every Python process of the run (PYTHONPATH); records only in `seamless` processes.
AUDIT = '''
import json, os, sys
_LOG = os.environ.get("SEAMLESS_AUDIT_DIR")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
if _LOG:
    _busy = [False]

    def _record(event, paths):
        argv = " ".join(sys.argv)
        if "seamless_core" not in argv or _busy[0]:
            return
        _busy[0] = True
        try:
            fd = os.open(os.path.join(_LOG, f"{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                line = json.dumps({"event": event, "paths": [os.path.abspath(os.fsdecode(p)) for p in paths],
                                   "argv": sys.argv[1:8]})
                os.write(fd, (line + "\\n").encode())
            finally:
                os.close(fd)
        finally:
            _busy[0] = False

    def _hook(event, args):
        if _busy[0]:
            return
        try:
            if event == "open":
                path, mode, flags = args
                if isinstance(path, (str, bytes)) and (any(c in (mode or "") for c in "wax+") or (flags or 0) & _WRITE_FLAGS):
                    _record(event, [path])
            elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.symlink", "os.link", "os.chmod",
                           "os.utime", "tempfile.mkstemp", "tempfile.mkdtemp"):
                if args and isinstance(args[0], (str, bytes)):
                    _record(event, [args[0]])
            elif event in ("os.rename", "shutil.move", "shutil.copyfile"):
                _record(event, [a for a in args[:2] if isinstance(a, (str, bytes))])
        except Exception:
            pass

    sys.addaudithook(_hook)
'''
KINDS = {"block_start", "compute_field", "vote", "block_render", "stitch", "compose", "render", "cpc", "cpc_source"}
POD_PROJECT = {"source": "gs://lab/em", "destination": "gs://lab/aligned", "mask": "gs://lab/defects",
               "bbox": [1024, 2048, 5120, 4096], "sections": {"start": 0, "stop": 14}, "blocks": {"size": 5, "decay_dist": 8},
               "fuse": "none"}


class Secrets:
    """Fake credentials, each value unique to this test run, and the places users put them."""

    def __init__(self, root: Path) -> None:
        self.values = {name: f"seamless-fake-{name}-{uuid.uuid4().hex}" for name in
                       ("gcs-private-key", "gcs-key-id", "cv-gcs-private-key", "cv-aws-key-id", "cv-aws-secret",
                        "aws-key-id", "aws-secret", "aws-session")}
        v = self.values
        self.home = root / "home"
        secrets = self.home / ".cloudvolume" / "secrets"
        secrets.mkdir(parents=True)
        self.key_file = root / "gcs-key.json"
        self.key_file.write_text(json.dumps(self.service_account(v["gcs-private-key"], v["gcs-key-id"])))
        (secrets / "google-secret.json").write_text(json.dumps(self.service_account(v["cv-gcs-private-key"], "cv")))
        (secrets / "aws-secret.json").write_text(json.dumps({"AWS_ACCESS_KEY_ID": v["cv-aws-key-id"],
                                                              "AWS_SECRET_ACCESS_KEY": v["cv-aws-secret"]}))
        self.env = {"HOME": str(self.home), "GOOGLE_APPLICATION_CREDENTIALS": str(self.key_file),
                    "AWS_ACCESS_KEY_ID": v["aws-key-id"], "AWS_SECRET_ACCESS_KEY": v["aws-secret"],
                    "AWS_SESSION_TOKEN": v["aws-session"]}

    @staticmethod
    def service_account(key: str, key_id: str) -> dict[str, str]:
        return {"type": "service_account", "project_id": "seamless-test", "private_key_id": key_id,
                "private_key": f"-----BEGIN PRIVATE KEY-----\n{key}\n-----END PRIVATE KEY-----\n",
                "client_email": "seamless@seamless-test.iam.gserviceaccount.com", "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token"}

    def needles(self) -> dict[bytes, str]:
        """Each value as bytes, plus the forms a leak could take: base64 and JSON-escaped."""
        out = {}
        for name, value in self.values.items():
            out[value.encode()] = name
            out[base64.b64encode(value.encode())[:40]] = f"{name} (base64)"
            out.setdefault(json.dumps(value).encode()[1:-1], f"{name} (JSON)")
        return out


class Scan:
    """Where the values were looked for, and how much was looked at."""

    def __init__(self, secrets: Secrets) -> None:
        self.needles = secrets.needles()
        self.found: list[str] = []
        self.bytes: dict[str, int] = {}
        self.items: dict[str, int] = {}

    def look(self, where: str, data: bytes | str, what: str) -> None:
        blob = data.encode(errors="surrogateescape") if isinstance(data, str) else data
        self.bytes[where] = self.bytes.get(where, 0) + len(blob)
        self.items[where] = self.items.get(where, 0) + 1
        for needle, name in self.needles.items():
            if needle in blob:
                self.found.append(f"{name} in {where}: {what}")

    def files(self, where: str, root: Path, skip: tuple[Path, ...] = ()) -> None:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not any(path.is_relative_to(s) for s in skip):
                self.look(where, path.read_bytes(), str(path.relative_to(root)))

    def database(self, path: Path) -> None:
        with sqlite3.connect(path) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for row in db.execute(f'SELECT * FROM "{table}"'):
                    for value in row:
                        if isinstance(value, bytes):
                            try:
                                value = zlib.decompress(value)
                            except zlib.error:
                                pass
                        if isinstance(value, (str, bytes)):
                            self.look(f"metadata DB ({table})", value, table)
        self.look("metadata DB file", path.read_bytes(), "raw pages")

    def report(self) -> str:
        return "; ".join(f"{w}: {self.items[w]} items, {self.bytes[w]} bytes" for w in sorted(self.bytes))


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Secrets:
    return Secrets(tmp_path_factory.mktemp("secrets"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, secrets: Secrets) -> dict[str, Any]:
    """`airflow dags test seamless_align` (local twin) of a 2-section project, with the credentials in place."""
    from workflow_helpers import deformed_stack

    root = tmp_path_factory.mktemp("secrets-run")
    stack = deformed_stack(root, [0, 0], SIZE, chunk=128, max_translation=6.0, cracked=(), debris=())
    project = root / "project.yaml"
    destination = root / "out"
    project.write_text(PROJECT.format(source=stack.path, destination=destination))
    audit, scratch, hooks, work = root / "audit", root / "scratch", root / "hooks", root / "work"
    for folder in (audit, scratch, hooks, work):
        folder.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT)
    home = root / "airflow"
    env = {**os.environ, **secrets.env, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "SEAMLESS_PROJECT": str(project), "SEAMLESS_EXECUTOR": "local",
           "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)]), "SEAMLESS_AUDIT_DIR": str(audit),
           "TMPDIR": str(scratch), "PYTHONDONTWRITEBYTECODE": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    conf = {"destination": str(destination), "device": "cpu"}

    def airflow(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["airflow", *args], env=env, cwd=work, capture_output=True, text=True, timeout=900)

    assert airflow("db", "migrate").returncode == 0
    assert airflow("pools", "set", "seamless_gpu", "2", "GPU steps").returncode == 0
    result = airflow("dags", "test", "seamless_align", "-c", json.dumps(conf))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    markers = sorted(p.stem for p in (destination / ".seamless" / "steps").glob("*.json"))
    return {"root": root, "home": home, "destination": destination, "console": result.stdout + result.stderr,
            "audit": audit, "scratch": scratch, "markers": markers, "project": project}


def test_no_credential_reaches_logs_xcoms_params_or_outputs_of_a_full_run(full_run, secrets) -> None:
    assert len(full_run["markers"]) == 9, full_run["markers"]  # every step of the plan ran
    scan = Scan(secrets)
    # `airflow dags test` prints every task's log (the operator's lines and its `seamless` child's output)
    scan.look("task logs (console of `airflow dags test`)", full_run["console"], "stdout+stderr")
    scan.files("AIRFLOW_HOME files (airflow.cfg, logs/)", full_run["home"], skip=(full_run["home"] / "airflow.db",))
    scan.database(full_run["home"] / "airflow.db")
    scan.files("destination (layers, markers, step reports)", full_run["destination"])
    with sqlite3.connect(full_run["home"] / "airflow.db") as db:
        xcoms = db.execute("SELECT count(*) FROM xcom WHERE dag_id = 'seamless_align'").fetchone()[0]
        conf = db.execute("SELECT conf FROM dag_run WHERE dag_id = 'seamless_align'").fetchone()[0]
    assert xcoms > 0, "no XCom to scan: the Neuroglancer links were expected there"
    assert conf, "the run's conf (its Params) was expected in the metadata DB"
    started = re.findall(r"running(?: \(warm step server, pid \d+\))?: ", full_run["console"])  # each task's step
    assert len(started) >= 9 and "compute_field z=1->0: done" in full_run["console"]
    # the scan would see a leak: the values are where users put them, and each needle is findable
    for name, value in secrets.values.items():
        assert value in secrets.env.values() or value in secrets.key_file.read_text() or \
            value in "".join(p.read_text() for p in (secrets.home / ".cloudvolume" / "secrets").iterdir()), name
    assert scan.found == [], scan.found
    print(f"\nscanned for {len(secrets.values)} credential values ({len(scan.needles)} forms): {scan.report()}; "
          f"{xcoms} XComs")


def test_steps_write_only_to_the_destination_and_tmp(full_run) -> None:
    records = [json.loads(line) for f in full_run["audit"].glob("*.jsonl") for line in f.read_text().splitlines()]
    processes = {f.stem for f in full_run["audit"].glob("*.jsonl")}
    steps = {r["argv"][r["argv"].index("--marker") + 1].rsplit("/", 1)[-1].removesuffix(".json")
             for r in records if "--marker" in r["argv"]}
    assert steps == set(full_run["markers"]), "the audit hook did not see every step's writes"
    allowed = (str(full_run["destination"]), str(full_run["scratch"]), "/dev/shm", "/dev/null")
    outside = sorted({(r["event"], p) for r in records for p in r["paths"]
                      if not any(p == a or p.startswith(a + "/") for a in allowed)})
    assert outside == [], f"a step wrote outside the destination and TMPDIR (a read-only root filesystem breaks it): {outside[:10]}"
    print(f"\n{len(records)} write operations by {len(processes)} `seamless` processes ({len(steps)} steps): "
          "all under the destination or TMPDIR")


# --- pods -------------------------------------------------------------------------------------------
class Created(Exception):
    """Raised by the stubbed get_or_create_pod: the pod request exists, the API would be called next."""


def runtime_context(dag, task, conf: dict[str, Any]) -> dict[str, Any]:
    import pendulum
    from airflow.sdk.api.datamodels._generated import DagRun, TIRunContext
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    now = pendulum.now("UTC")
    run = DagRun(dag_id=dag.dag_id, run_id="manual__secrets", logical_date=None, data_interval_start=None,
                 data_interval_end=None, run_after=now, start_date=now, end_date=None, run_type="manual",
                 state="running", conf=conf, consumed_asset_events=[], partition_key=None)
    ti = RuntimeTaskInstance.model_construct(
        id=uuid.uuid4(), task_id=task.task_id, dag_id=dag.dag_id, run_id=run.run_id, try_number=1, map_index=-1,
        start_date=now, task=task, max_tries=task.retries, dag_version_id=uuid.uuid4(),
        _ti_context_from_server=TIRunContext(dag_run=run, max_tries=task.retries))
    return ti.get_template_context()


def test_pod_specs_of_every_step_kind_carry_no_credential_and_run_locked_down(tmp_path, secrets, monkeypatch) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from kubernetes.client import ApiClient

    from operators.settings import ENV_VARIABLE
    from seamless_core.config import parse_config
    from seamless_core.plan import build_plan

    settings = dag_settings(render({"secrets": {"gcs": {"enabled": True}, "aws": {"enabled": True}}}))
    assert settings["secret_names"]["gcs"] and settings["secret_names"]["aws"]
    project = tmp_path / "project.yaml"
    project.write_text(yaml.safe_dump(POD_PROJECT))
    monkeypatch.setenv("SEAMLESS_PROJECT", str(project))
    monkeypatch.setenv("SEAMLESS_EXECUTOR", "kubernetes")
    monkeypatch.setenv("SEAMLESS_GPU_POOL", settings["airflow_pool"])
    for key, value in secrets.env.items():  # the scheduler's environment holds the credentials
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(ENV_VARIABLE, json.dumps(settings))
    bag = DagBag(dag_folder=str(REPO / "dags" / "seamless_align.py"),
                 known_pools={"default_pool", settings["airflow_pool"]})
    assert bag.import_errors == {}, bag.import_errors
    dag = bag.dags["seamless_align"]
    plan = build_plan(parse_config(POD_PROJECT))
    assert set(plan.kinds()) == KINDS
    scan = Scan(secrets)
    for kind in sorted(KINDS):
        step = [s for s in plan.steps if s.kind == kind][-1]
        task = dag.task_dict[step.id]
        saved = copy.deepcopy(dag.params)
        context = runtime_context(dag, task, {"device": "cuda"})
        task.pod_template_dict = task.pod_request_obj = task.pod = None
        task.__dict__["hook"] = types.SimpleNamespace(is_in_cluster=False, core_v1_client=None)  # no API server (tests/deploy)
        sent: list[Any] = []

        def get_or_create_pod(pod_request_obj, context, sent=sent):
            sent.append(pod_request_obj)
            raise Created

        monkeypatch.setattr(task, "get_or_create_pod", get_or_create_pod)
        with pytest.raises(Created):
            task.execute(context)
        dag.params = saved
        pod = ApiClient().sanitize_for_serialization(sent[0])
        assert not k8s_validate(pod), (kind, k8s_validate(pod))
        scan.look("pod specs", json.dumps(pod), kind)
        spec, (container,) = pod["spec"], pod["spec"]["containers"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0, kind
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, kind
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"], kind
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert writable == {"/tmp", "/dev/shm"}, (kind, writable)
        assert {v["name"] for v in spec["volumes"] if "emptyDir" in v} >= {"tmp", "dshm"}, kind
        for env in container.get("env", []):  # the credentials travel as mounted files, named by path only
            assert "valueFrom" not in env and env["value"].startswith(settings["volume_mounts"][0]["mountPath"]), env
        assert not container.get("envFrom"), kind
    assert scan.found == [], scan.found
    print(f"\n{len(KINDS)} pod specs scanned ({scan.bytes['pod specs']} bytes): no credential; all non-root, "
          "read-only root filesystem, writable /tmp and /dev/shm only")


def test_missing_credentials_are_named_not_dumped(tmp_path, secrets) -> None:
    """A task without credentials for gs:// fails with a message saying where they go (exit 3), no traceback;
    with the fake (unusable) keys in place it fails the same way, and its output echoes no key."""
    empty = tmp_path / "empty-home"
    (empty / ".cloudvolume" / "secrets").mkdir(parents=True)
    base = {k: v for k, v in os.environ.items() if k not in secrets.env and not k.startswith(("AWS_", "GOOGLE_"))}
    base.update({"NO_GCE_CHECK": "True", "AWS_EC2_METADATA_DISABLED": "true", "PYTHONPATH": str(REPO)})
    bare = subprocess.run([sys.executable, "-m", "seamless_core", "info", "gs://seamless-test-bucket/em"],
                          env={**base, "HOME": str(empty)}, capture_output=True, text=True, timeout=300)
    assert bare.returncode == 3, bare.stderr[-3000:]
    assert "no usable credentials to read gs://seamless-test-bucket/em" in bare.stderr, bare.stderr[-2000:]
    assert "google-secret.json" in bare.stderr
    assert "Traceback" not in bare.stderr + bare.stdout
    with_keys = subprocess.run([sys.executable, "-m", "seamless_core", "info", "gs://seamless-test-bucket/em"],
                               env={**base, **secrets.env}, capture_output=True, text=True, timeout=300)
    assert with_keys.returncode == 3, with_keys.stderr[-2000:]
    assert "no usable credentials to read gs://seamless-test-bucket/em" in with_keys.stderr, with_keys.stderr[-2000:]
    assert "Traceback" not in with_keys.stderr + with_keys.stdout
    scan = Scan(secrets)
    scan.look("error output with fake keys", with_keys.stdout + with_keys.stderr, "seamless info gs://")
    assert scan.found == [], scan.found
