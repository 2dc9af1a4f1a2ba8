"""The pods SeamlessPodOperator builds agree with the Helm chart, and are valid Kubernetes objects.

The pod is built by the real KubernetesPodOperator code (`build_pod_request_obj`). Only its hook is
replaced, by a stub that answers `is_in_cluster`: no Kubernetes API server can run here, and building
the pod asks the hook nothing else.
"""

from __future__ import annotations

import os
import types
from typing import Any

import pytest

os.environ.setdefault("AIRFLOW_HOME", "/tmp/seamless-test-airflow-home")
pytest.importorskip("airflow.providers.cncf.kubernetes", reason="needs the airflow extra (scripts/test.sh installs it)")

from kubernetes.client import ApiClient  # noqa: E402

import yaml  # noqa: E402
from deploy_helpers import CHART, dag_settings, deep_merge, k8s_validate, one, render, values_file  # noqa: E402
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
