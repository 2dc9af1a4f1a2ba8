"""The pods SeamlessPodOperator builds agree with the Helm chart, and are valid Kubernetes objects.

The pod is built by the real KubernetesPodOperator code (`build_pod_request_obj`). Only its hook is
replaced, by a stub that answers `is_in_cluster`: no Kubernetes API server can run here, and building
the pod asks the hook nothing else.

The exit-code policy is checked by driving the provider's own end-of-pod code (`post_complete_action`
for the sync path, `trigger_reentry` for the deferrable one) with a V1Pod whose container terminated
with a given code; only the Kubernetes API calls (read, patch, delete the pod, read its log) are mocks.
"""

from __future__ import annotations

import os
import types
from typing import Any
from unittest import mock

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/seamless-test-airflow-home")
pytest.importorskip("airflow.providers.cncf.kubernetes", reason="needs the airflow extra (scripts/test.sh installs it)")

import yaml  # noqa: E402
from airflow.sdk.exceptions import AirflowException, AirflowFailException  # noqa: E402
from deploy_helpers import CHART, dag_settings, deep_merge, k8s_validate, one, render, values_file  # noqa: E402
from kubernetes.client import ApiClient  # noqa: E402
from kubernetes.client import models as k8s  # noqa: E402

from operators.pod import SeamlessPodOperator  # noqa: E402
from operators.settings import SettingsError, load_settings  # noqa: E402

VALUE_SETS = {"defaults": {}, "gke-example": values_file("values-gke.yaml"), "eks-example": values_file("values-eks.yaml")}
STEP = ["render", "--src", "gs://lab/em", "--field", "gs://lab/field", "--dst", "gs://lab/out", "--z", "1012:1013"]


def built_pod(settings: dict[str, Any], pool: str) -> dict[str, Any]:
    operator = SeamlessPodOperator(task_id="render_z1012", step=STEP, pool_kind=pool, settings=settings)
    operator.__dict__["hook"] = types.SimpleNamespace(is_in_cluster=False)  # no API server here (see docstring)
    return ApiClient().sanitize_for_serialization(operator.build_pod_request_obj())


def secret_names(pod: dict[str, Any]) -> set[str]:
    names = set()
    for volume in pod["spec"].get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_pod_spec_and_chart_rbac_agree(name: str, pool: str) -> None:
    objs = render(VALUE_SETS[name])
    settings = dag_settings(objs)
    pod = built_pod(settings, pool)
    assert not k8s_validate(pod), k8s_validate(pod)
    spec, container = pod["spec"], pod["spec"]["containers"][0]

    # namespace: the pod lands where the chart's Role lets the Airflow scheduler create and watch pods
    namespace = pod["metadata"]["namespace"]
    role = one(objs, "Role")
    assert role["metadata"]["namespace"] == namespace
    pod_rule = next(r for r in role["rules"] if "pods" in r["resources"])
    assert {"create", "get", "watch", "delete"} <= set(pod_rule["verbs"])
    assert any("pods/log" in r["resources"] and "get" in r["verbs"] for r in role["rules"])  # logs stream
    binding = one(objs, "RoleBinding")
    assert binding["metadata"]["namespace"] == namespace and binding["roleRef"]["name"] == role["metadata"]["name"]

    # identity: the pod runs as the chart's task ServiceAccount, in that namespace, with no API token
    accounts = [o for o in objs if o["kind"] == "ServiceAccount"]
    if accounts:  # "create: false" value sets reference an existing one
        assert spec["serviceAccountName"] == accounts[0]["metadata"]["name"]
        assert accounts[0]["metadata"]["namespace"] == namespace
    assert spec["automountServiceAccountToken"] is False

    # credentials: exactly the Secrets the chart's values enable (read from values.yaml + the example,
    # not from the settings under test), mounted where CloudVolume looks, never their contents
    values = deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), VALUE_SETS[name])
    expected = {c["secretName"] for c in values["secrets"].values() if isinstance(c, dict) and c.get("enabled")}
    assert expected and secret_names(pod) == expected
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == values["secrets"]["mountPath"])
    assert mount["readOnly"] is True
    for env in container.get("env", []):  # only file paths and plain settings, no inline credentials
        assert "valueFrom" not in env or "secretKeyRef" not in env["valueFrom"]

    # placement and resources for the pool
    assert spec["nodeSelector"] == settings[pool]["node_selector"]
    assert spec["tolerations"] == settings[pool]["tolerations"]
    if pool == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(settings["gpu"]["limits"]["nvidia.com/gpu"])
    # the step as an argument list for the image's `seamless` entry point, never a shell string
    assert container["args"] == STEP and not container.get("command")
    # torch needs a real /dev/shm
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    # the restricted Pod Security Standard the task namespace enforces
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_step_must_be_an_argument_list() -> None:
    with pytest.raises(TypeError, match="never a shell string"):
        SeamlessPodOperator(task_id="bad", step="render --z 1")  # type: ignore[arg-type]


def test_settings_errors_name_the_variable() -> None:
    with pytest.raises(SettingsError, match="seamless_k8s"):
        load_settings("")
    with pytest.raises(SettingsError, match="not JSON"):
        load_settings("{nope")
    with pytest.raises(SettingsError, match="lacks namespace"):
        load_settings('{"service_account": "a", "image": "i", "gpu": {}, "cpu": {}}')


def test_settings_are_read_at_run_time_not_parse_time(monkeypatch) -> None:
    operator = SeamlessPodOperator(task_id="late", step=["cpc", "--z", "3:4"], pool_kind="cpu")
    assert operator.pod_template_dict is None  # parsing a DAG reads no Variable


# --- exit codes: 2 and 3 fail without retry, as in the local twin ---------------------------------------------
LAST_LINE = "error: no layer at gs://lab/em (no info file)"


def finished_pod(code: int) -> k8s.V1Pod:
    """A pod whose `base` container terminated with `code` (restartPolicy Never: the pod's phase follows)."""
    terminated = k8s.V1ContainerStateTerminated(exit_code=code, reason="Completed" if code == 0 else "Error",
                                                message=f"progress 3/4 chunks\n{LAST_LINE}\n")
    status = k8s.V1ContainerStatus(name="base", image="seamless-worker:0.1.0", image_id="", ready=False,
                                   restart_count=0, state=k8s.V1ContainerState(terminated=terminated))
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="seamless-vote-x1y2z3", namespace="seamless-tasks", labels={}),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base")]),
        status=k8s.V1PodStatus(phase="Succeeded" if code == 0 else "Failed", container_statuses=[status]),
    )


def operator_without_api(pod: k8s.V1Pod) -> tuple[SeamlessPodOperator, mock.Mock, mock.Mock]:
    """The operator with its Kubernetes API clients replaced by mocks that answer with `pod`."""
    operator = SeamlessPodOperator(task_id="z12.vote", step=["--marker", "m.json", "vote", "--z", "12"], pool_kind="gpu")
    client, pod_manager = mock.Mock(name="CoreV1Api"), mock.Mock(name="PodManager")
    pod_manager.read_pod.return_value = pod  # the istio check reads the pod back
    pod_manager.await_pod_completion.return_value = pod
    client.read_namespaced_pod_log.return_value = [f"{LAST_LINE}\n".encode()]
    operator.__dict__.update(client=client, pod_manager=pod_manager,
                             hook=types.SimpleNamespace(is_in_cluster=False, get_pod=lambda name, namespace: pod))
    return operator, client, pod_manager


@pytest.mark.parametrize(("code", "meaning"), [(2, "bad command line"), (3, "bad input")])
def test_usage_and_bad_input_exits_fail_without_retry(code: int, meaning: str) -> None:
    pod = finished_pod(code)
    operator, _, pod_manager = operator_without_api(pod)
    with pytest.raises(AirflowFailException) as info:
        operator.post_complete_action(pod=pod, remote_pod=pod, context=None, result=None)
    assert str(info.value) == (f"seamless vote exited with code {code} ({meaning}) in pod "
                               f"seamless-tasks/seamless-vote-x1y2z3, not retried: {LAST_LINE}")
    pod_manager.delete_pod.assert_called_once_with(pod)  # the failed pod is still cleaned up
    assert isinstance(info.value.__cause__, AirflowException)  # the provider's own failure, kept as the cause


def test_the_deferrable_path_applies_the_same_policy() -> None:
    pod = finished_pod(3)
    operator, _, pod_manager = operator_without_api(pod)
    event = {"status": "failed", "name": pod.metadata.name, "namespace": pod.metadata.namespace,
             "message": "Pod failed"}
    with pytest.raises(AirflowFailException, match=r"code 3 \(bad input\)"):
        operator.trigger_reentry(context={}, event=event)
    pod_manager.delete_pod.assert_called_once_with(pod)


@pytest.mark.parametrize("code", [1, 4, 137])
def test_other_failures_stay_retryable(code: int) -> None:
    pod = finished_pod(code)
    operator, _, _ = operator_without_api(pod)
    with pytest.raises(AirflowException, match="returned a failure") as info:
        operator.post_complete_action(pod=pod, remote_pod=pod, context=None, result=None)
    assert not isinstance(info.value, AirflowFailException)


def test_success_raises_nothing() -> None:
    pod = finished_pod(0)
    operator, _, pod_manager = operator_without_api(pod)
    operator.post_complete_action(pod=pod, remote_pod=pod, context=None, result=None)
    pod_manager.delete_pod.assert_called_once_with(pod)


# --- the steps' figures become the task's XCom, read off the pod's log ------------------------------------------
def test_the_steps_figures_are_read_off_the_streamed_log() -> None:
    """The provider's own PodManager streams the log through the operator's callbacks; only the Kubernetes
    API (the log stream, reading the pod back) is a mock, as above."""
    import datetime
    import json

    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager

    from operators.pod import take_figures

    pod = finished_pod(0)
    pod.status.container_statuses[0].state.terminated.finished_at = datetime.datetime.now(datetime.timezone.utc)
    operator = SeamlessPodOperator(task_id="z12.vote", step=["vote", "--z", "12"], pool_kind="gpu")
    reports = [{"step": "compute_field", "chunks": 4, "seconds": 2.5}, {"step": "vote", "chunks": 4, "mpx_per_s": 1.2}]
    lines = ["vote: 2/4 chunks (50%)", json.dumps(reports[0]), '{"not": "a report"}', "{ broken", json.dumps(reports[1])]
    blob = "".join(f"2026-12-07T06:00:0{i}.000000000Z {line}\n" for i, line in enumerate(lines)).encode()
    client = mock.Mock(name="CoreV1Api")
    client.read_namespaced_pod_log.return_value = mock.Mock(stream=lambda **_: iter([blob[:50], blob[50:]]))
    client.read_namespaced_pod.return_value = pod
    PodManager(kube_client=client, callbacks=operator.callbacks).fetch_container_logs(pod, "base", follow=False)
    assert take_figures(pod.metadata.namespace, pod.metadata.name) == {"steps": reports}
    assert take_figures(pod.metadata.namespace, pod.metadata.name) is None  # taken once, nothing left behind


def test_the_deferrable_path_returns_the_figures_and_forgets_them() -> None:
    from operators.pod import StepFigureCallback, take_figures

    pod = finished_pod(0)
    operator, _, _ = operator_without_api(pod)
    StepFigureCallback.progress_callback(line='{"step": "vote", "chunks": 3}', container_name="base", pod=pod,
                                         client=None, mode="async", timestamp=None)
    StepFigureCallback.progress_callback(line='{"step": "sidecar"}', container_name="istio-proxy", pod=pod,
                                         client=None, mode="async", timestamp=None)
    event = {"status": "success", "name": pod.metadata.name, "namespace": pod.metadata.namespace, "message": ""}
    assert operator.trigger_reentry(context={}, event=event) == {"steps": [{"step": "vote", "chunks": 3}]}
    assert take_figures(pod.metadata.namespace, pod.metadata.name) is None


def test_a_re_deferral_keeps_the_figures_for_the_final_reentry() -> None:
    """The trigger can return while the pod still runs; the provider then defers again (TaskDeferred).
    The figures already read off the log must survive that and come back at the final re-entry."""
    from airflow.sdk.exceptions import TaskDeferred

    from operators.pod import StepFigureCallback, take_figures

    running = finished_pod(0)
    running.status.phase = "Running"
    running.status.container_statuses[0].state = k8s.V1ContainerState(running=k8s.V1ContainerStateRunning())
    operator, _, _ = operator_without_api(running)
    StepFigureCallback.progress_callback(line='{"step": "compute_field", "chunks": 2}', container_name="base",
                                         pod=running, client=None, mode="async", timestamp=None)
    event = {"status": "error", "name": running.metadata.name, "namespace": running.metadata.namespace,
             "message": "trigger stopped watching"}
    with pytest.raises(TaskDeferred):
        operator.trigger_reentry(context={}, event=event)
    finished = finished_pod(0)
    operator, _, _ = operator_without_api(finished)
    StepFigureCallback.progress_callback(line='{"step": "vote", "chunks": 2}', container_name="base", pod=finished,
                                         client=None, mode="async", timestamp=None)
    event = {"status": "success", "name": finished.metadata.name, "namespace": finished.metadata.namespace,
             "message": ""}
    assert operator.trigger_reentry(context={}, event=event) == {
        "steps": [{"step": "compute_field", "chunks": 2}, {"step": "vote", "chunks": 2}]}
    assert take_figures(finished.metadata.namespace, finished.metadata.name) is None
