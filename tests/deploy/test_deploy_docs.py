"""docs/deploy.md stays in step with the chart: contract keys, names, paths, --set values, snippets."""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import pytest
import yaml
from deploy_helpers import CHART, REPO, dag_settings, deep_merge, k8s_validate, render

DOC = (REPO / "docs" / "deploy.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(f"## {title}")
    end = DOC.find("\n## ", start + 3)
    return DOC[start : end if end != -1 else None]


def test_contract_table_lists_exactly_the_keys_the_chart_renders() -> None:
    settings = dag_settings(render())
    table = _section("The contract between the chart and the DAGs")
    documented = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    assert sorted(documented) == sorted(settings), (sorted(documented), sorted(settings))


def test_default_names_in_the_docs_are_the_charts() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    s = dag_settings(render())
    names = [
        s["namespace"],
        s["service_account"],
        s["priority_class"],
        s["airflow_pool"],
        values["secrets"]["gcs"]["secretName"],
        values["secrets"]["aws"]["secretName"],
        "seamless-dag-settings",
        "seamless-pod-launcher",
        "seamless-task-pods",
        "seamless_k8s",
        "AIRFLOW_VAR_SEAMLESS_K8S",
        values["airflow"]["fernetKeySecretName"],
        values["airflow"]["apiSecretKeySecretName"],
        values["airflow"]["jwtSecretName"],
        *values["rbac"]["launchers"],
    ]
    missing = [n for n in names if f"`{n}`" not in DOC and n not in DOC]
    assert not missing, missing
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert f"**{chart['dependencies'][0]['version']}**" in DOC
    image = re.search(r"^ARG AIRFLOW_IMAGE=(\S+)", (REPO / "docker" / "airflow.Dockerfile").read_text(), re.M)
    assert f"`{image.group(1)}`" in DOC


def test_the_gke_pool_commands_match_the_chart_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["gpuPool"]
    label = re.search(r"--node-labels (\S+)=(\S+)", DOC)
    assert values["nodeSelector"] == {label.group(1): label.group(2)}
    taint = re.search(r"--node-taints (\S+)=(\S+):(\S+)", DOC)
    key, value, effect = taint.groups()
    assert {"key": key, "operator": "Equal", "value": value, "effect": effect} in values["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in values["tolerations"]


def test_every_repository_path_in_the_docs_exists() -> None:
    paths = set(
        re.findall(r"(?<![\w/.-])((?:docker|helm|tests|docs|scripts|dags|operators)/[\w./-]*\w)", DOC)
    )
    paths |= {f"helm/seamless-airflow/examples/{m}" for m in re.findall(r"examples/(values-\w+\.yaml)", DOC)}
    assert paths
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, missing


SET = re.compile(r"--set ([\w.\-/]+)=([^\s`]+)")


def test_every_set_in_the_docs_is_accepted_by_the_chart() -> None:
    sets = SET.findall(DOC)
    assert len(sets) >= 5
    values: dict[str, Any] = {}
    for key, value in sets:
        value = re.sub(r"\$\{?\w+\}?", "x1", value)
        values = deep_merge(values, helm.parse_set_string(f"{key}={value}"))
    objs = render(values)
    assert dag_settings(objs)["image"] == "seamless-worker:x1"


def _values_snippets() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
    ours = {
        "tasks",
        "secrets",
        "networkPolicy",
        "airflow",
        "gpuPool",
        "cpuPool",
        "worker",
        "airflowPool",
        "rbac",
    }
    snippets = [yaml.safe_load(b) for b in blocks]
    return [s for s in snippets if isinstance(s, dict) and set(s) <= ours]


@pytest.mark.parametrize("index", range(2))
def test_values_snippets_in_the_docs_render(index: int) -> None:
    snippets = _values_snippets()
    assert len(snippets) == 2, "expected the Workload Identity and the Cloud SQL snippets"
    snippet = snippets[index]
    objs = render(snippet)
    errors = [e for o in objs for e in k8s_validate(o)]
    assert not errors, errors
    if "tasks" in snippet:
        sa = next(o for o in objs if o["kind"] == "ServiceAccount")
        assert "iam.gke.io/gcp-service-account" in sa["metadata"]["annotations"]
        assert dag_settings(objs)["volumes"] == []
