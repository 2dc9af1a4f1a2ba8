"""Helpers for the deployment tests: render the Helm chart offline and validate Kubernetes manifests.

(A plain module, not a conftest.py: tests/conftest.py is imported as `conftest` by other test modules, and
a second conftest.py here would shadow it. Test modules import from it; pytest puts tests/deploy on sys.path.)

Everything here is real: the chart is rendered by Helm's own Go SDK (helm-python-sdk embeds Helm v4, no
binary, no cluster), manifests are checked against the Kubernetes OpenAPI schemas that kubernetes-validate
ships. Nothing is mocked.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "seamless-airflow"
EXAMPLES = CHART / "examples"
RELEASE = "seamless"
RELEASE_NAMESPACE = "airflow"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema bundled with
# kubernetes-validate: every manifest must validate against both.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# The official Airflow chart cannot be fetched offline: our own templates are rendered without it.
WITHOUT_AIRFLOW = {"airflow": {"enabled": False}}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Later values win; maps merge key by key (as `helm -f a.yaml -f b.yaml` does)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def values_file(name: str) -> dict[str, Any]:
    """A values file from examples/, parsed by Helm's own YAML reader (as `helm -f` reads it)."""
    return helm.values_from_yaml((EXAMPLES / name).read_text())


def render_raw(values: dict[str, Any] | None = None, chart_dir: Path = CHART) -> dict[str, str]:
    with helm.Chart.load(chart_dir) as chart:
        return chart.render(values, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in a render (NOTES.txt and empty documents left out)."""
    objs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objs


def render(*layers: dict[str, Any]) -> list[dict[str, Any]]:
    """Our templates (official chart disabled) with values layers merged in order."""
    values: dict[str, Any] = {}
    for layer in (*layers, WITHOUT_AIRFLOW):
        values = deep_merge(values, layer)
    return manifests(render_raw(values))


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    )
    return found[0]


def dag_settings(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The contract the DAG side reads: the JSON in ConfigMap seamless-dag-settings."""
    cm = one(objs, "ConfigMap", "seamless-dag-settings")
    return json.loads(cm["data"]["AIRFLOW_VAR_SEAMLESS_K8S"])


def k8s_validate(obj: dict[str, Any]) -> list[str]:
    """Validate one object against every KUBE_VERSIONS schema (strict: unknown fields are errors)."""
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            errors.append(f"{obj['kind']}/{obj['metadata'].get('name')} vs {version}: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{obj['kind']}/{obj['metadata'].get('name')}: {e.message}")
    return errors
