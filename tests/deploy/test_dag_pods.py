"""Every kind of step of the `seamless_align` DAG, on Kubernetes, gets a valid pod running the plan's argv.

The DAG file is parsed by Airflow's DagBag with SEAMLESS_EXECUTOR=kubernetes (the pool the chart creates
given as SEAMLESS_GPU_POOL). For one task of every step kind the plan produces, the task's own `execute`
runs with the template context of a real runtime task instance whose run overrides Params, and the real
KubernetesPodOperator code builds the pod from the Helm chart's rendered settings (defaults, GKE and EKS
examples). No Kubernetes API server can run here, so two things are stubbed, nothing else: the hook
(only `is_in_cluster` is asked while building the pod, and `core_v1_client`, which the provider hands to
the operator's callbacks: operators.pod.StepFigureCallback ignores it) and `get_or_create_pod`, the call that would POST
the pod, which keeps the request and stops the task there. Each pod is validated with kubernetes-validate.
"""

from __future__ import annotations

import copy
import json
import os
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/seamless-test-airflow-home")
pytest.importorskip("airflow.providers.cncf.kubernetes", reason="needs the airflow extra (scripts/test.sh installs it)")

import pendulum
import yaml
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.api.datamodels._generated import DagRun, TIRunContext
from airflow.sdk.exceptions import AirflowFailException
from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
from deploy_helpers import REPO, dag_settings, k8s_validate, render, values_file
from kubernetes.client import ApiClient

from operators.local import SeamlessLocalOperator
from operators.pod import SeamlessPodOperator
from operators.settings import ENV_VARIABLE
from seamless_core.config import parse_config
from seamless_core.plan import build_plan

VALUE_SETS = {"defaults": {}, "gke-example": values_file("values-gke.yaml"), "eks-example": values_file("values-eks.yaml")}
PROJECT = {
    "source": "gs://lab/em", "destination": "gs://lab/aligned", "mask": "gs://lab/defects",
    "bbox": [1024, 2048, 5120, 4096], "sections": {"start": 0, "stop": 14}, "blocks": {"size": 5, "decay_dist": 8},
    "fuse": "none",  # a pod per step: every step kind's pod is built and checked
}
RUN_CONF = {"destination": "gs://lab/rerun", "chunk": 512, "device": "cuda"}  # what a trigger form may change
KINDS = {"block_start", "compute_field", "vote", "block_render", "stitch", "compose", "render", "cpc", "cpc_source"}


class Created(Exception):
    """Raised by the stubbed get_or_create_pod: the pod request exists, the API would be called next."""


@pytest.fixture(scope="module")
def chart_settings() -> dict[str, dict[str, Any]]:
    return {name: dag_settings(render(values)) for name, values in VALUE_SETS.items()}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pods") / "project.yaml"
    path.write_text(yaml.safe_dump(PROJECT))
    return path


@pytest.fixture(scope="module")
def dag(project: Path, chart_settings):
    pools = {s["airflow_pool"] for s in chart_settings.values()}
    assert len(pools) == 1, f"the value sets name different Airflow pools {pools}: parse once per pool"
    (pool,) = pools
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEAMLESS_PROJECT", str(project))
        mp.setenv("SEAMLESS_EXECUTOR", "kubernetes")
        mp.setenv("SEAMLESS_GPU_POOL", pool)
        bag = DagBag(dag_folder=str(REPO / "dags" / "seamless_align.py"), known_pools={"default_pool", pool})
    assert bag.import_errors == {} and bag.dag_warnings == set(), (bag.import_errors, bag.dag_warnings)
    return bag.dags["seamless_align"]


@pytest.fixture(autouse=True)
def fresh_params(dag):
    """Airflow's process_params resolves a run's conf into the DAG's own Param objects: harmless where a
    process runs one task, but tests share the parsed DAG, so each test gets the parse-time Params back."""
    saved = copy.deepcopy(dag.params)
    yield
    dag.params = saved


def runtime_context(dag, task, conf: dict[str, Any]) -> dict[str, Any]:
    """The template context Airflow's task runner gives `execute`: a real RuntimeTaskInstance (built without
    the API server's validation round trip) whose DagRun carries `conf`; its Params are processed by Airflow."""
    now = pendulum.now("UTC")
    run = DagRun(dag_id=dag.dag_id, run_id="manual__pods", logical_date=None, data_interval_start=None,
                 data_interval_end=None, run_after=now, start_date=now, end_date=None, run_type="manual",
                 state="running", conf=conf, consumed_asset_events=[], partition_key=None)
    ti = RuntimeTaskInstance.model_construct(
        id=uuid.uuid4(), task_id=task.task_id, dag_id=dag.dag_id, run_id=run.run_id, try_number=1, map_index=-1,
        start_date=now, task=task, max_tries=task.retries, dag_version_id=uuid.uuid4(),
        _ti_context_from_server=TIRunContext(dag_run=run, max_tries=task.retries),
    )
    return ti.get_template_context()


def pod_of(task: SeamlessPodOperator, context: dict[str, Any], settings: dict[str, Any], monkeypatch) -> dict[str, Any]:
    """Run the task's execute() up to the pod creation; the pod request it would send, as JSON."""
    monkeypatch.setenv(ENV_VARIABLE, json.dumps(settings))  # how the chart hands the settings to Airflow
    task.pod_template_dict = task.pod_request_obj = task.pod = None  # module-scoped DAG: a fresh try
    task.__dict__["hook"] = types.SimpleNamespace(is_in_cluster=False, core_v1_client=None)  # no API server (module docstring)
    sent: list[Any] = []

    def get_or_create_pod(pod_request_obj, context):
        sent.append(pod_request_obj)
        raise Created

    monkeypatch.setattr(task, "get_or_create_pod", get_or_create_pod)
    with pytest.raises(Created):
        task.execute(context)
    return ApiClient().sanitize_for_serialization(sent[0])


def expected_plan():
    """The plan for the project with the run's conf applied, built here without the operators' code."""
    return build_plan(parse_config({**PROJECT, **RUN_CONF}))


def test_the_kubernetes_dag_runs_pod_operators_with_a_plan_reference(dag) -> None:
    plan = build_plan(parse_config(PROJECT))
    assert set(plan.kinds()) >= KINDS, plan.kinds()
    for step in plan.steps:
        task = dag.task_dict[step.id]
        assert isinstance(task, SeamlessPodOperator), type(task)
        assert task.plan_ref is not None and task.plan_ref.step_id == step.id
        assert task.step == plan.argv(step) and task.pool_kind == ("gpu" if step.gpu else "cpu")
        assert task.pod_template_dict is None  # no settings read while parsing


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_every_step_kind_gets_a_valid_pod_running_the_plans_argv(values, dag, chart_settings, monkeypatch) -> None:
    settings = chart_settings[values]
    plan = expected_plan()
    kinds = plan.kinds()
    assert set(kinds) >= KINDS, kinds
    checked = set()
    for kind in kinds:
        step = [s for s in plan.steps if s.kind == kind][-1]  # the last: compose then carries stitch fields
        task = dag.task_dict[step.id]
        context = runtime_context(dag, task, RUN_CONF)
        pod = pod_of(task, context, settings, monkeypatch)
        where = f"{values}/{step.id}"
        assert not k8s_validate(pod), (where, k8s_validate(pod))
        spec, (container,) = pod["spec"], pod["spec"]["containers"]

        # the run's argv: the plan's for the run's Params, an argument list, identical to the local twin's
        assert container["args"] == plan.argv(step), where
        assert container["args"][1].startswith("gs://lab/rerun/.seamless/steps/"), where  # the Params apply
        assert not container.get("command"), "the image's ENTRYPOINT is `seamless`"
        twin = SeamlessLocalOperator(task_id="twin", step=task.step, plan_ref=task.plan_ref)
        assert twin.resolved_step(context) == container["args"], where
        assert pod["metadata"]["name"].startswith(f"seamless-{step.args[0]}-")

        # placement: GPU steps on the GPU node pool with its GPU limit and tolerations, the rest without
        limits = container.get("resources", {}).get("limits", {})
        requests = container.get("resources", {}).get("requests", {})
        gpu_resource = settings["gpu"]["resource_name"]
        if step.gpu:
            assert task.pool_kind == "gpu" and task.pool == settings["airflow_pool"], where
            assert limits[gpu_resource] == str(settings["gpu"]["per_pod"]), where
            assert spec["nodeSelector"] == settings["gpu"]["node_selector"] and spec["nodeSelector"], where
            assert spec["tolerations"] == settings["gpu"]["tolerations"] and spec["tolerations"], where
        else:
            assert task.pool_kind == "cpu" and task.pool == "default_pool", where
            assert gpu_resource not in limits and gpu_resource not in requests, where
            assert spec.get("nodeSelector", {}) == settings["cpu"]["node_selector"], where
            assert spec.get("tolerations", []) == settings["cpu"]["tolerations"], where
            assert not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), where

        # torch's shared memory
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]

        # credentials: mounted read-only from exactly the enabled Secrets; env carries file paths only
        enabled = {name for name in settings["secret_names"].values() if name}
        mounted = {s["secret"]["name"] for v in spec["volumes"] for s in v.get("projected", {}).get("sources", [])
                   if "secret" in s} | {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert mounted == enabled, where
        mount_paths = {m["mountPath"] for m in settings["volume_mounts"]}
        for mount in container["volumeMounts"]:
            if mount["mountPath"] in mount_paths:
                assert mount["readOnly"] is True
        assert not container.get("envFrom")
        for env in container.get("env", []):
            assert "valueFrom" not in env, env  # no secretKeyRef: a credential never becomes an env value
            assert any(env["value"].startswith(p) for p in mount_paths), env

        # identity and the restricted Pod Security Standard, as the chart's settings say
        assert pod["metadata"]["namespace"] == settings["namespace"]
        assert spec["serviceAccountName"] == settings["service_account"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"] == settings["pod_security_context"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
        assert container["securityContext"] == settings["container_security_context"]
        assert container["securityContext"].get("readOnlyRootFilesystem") == \
            settings["container_security_context"].get("readOnlyRootFilesystem")
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert set(settings["pod_labels"].items()) <= set(pod["metadata"]["labels"].items())  # NetworkPolicy
        assert pod["metadata"]["labels"]["task_id"] == step.id
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
        checked.add(kind)
    assert checked == set(kinds)


def test_params_that_change_the_structure_create_no_pod(dag, chart_settings, monkeypatch) -> None:
    task = dag.task_dict["z12.vote"]
    context = runtime_context(dag, task, {"section_stop": 20})
    monkeypatch.setenv(ENV_VARIABLE, json.dumps(chart_settings["defaults"]))
    task.pod_template_dict = task.pod_request_obj = task.pod = None
    task.__dict__["hook"] = types.SimpleNamespace(is_in_cluster=False, core_v1_client=None)
    monkeypatch.setattr(task, "get_or_create_pod", lambda **_: pytest.fail("a pod was requested"))
    with pytest.raises(AirflowFailException, match="change the DAG's task structure"):
        task.execute(context)
