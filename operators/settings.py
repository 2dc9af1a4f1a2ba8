"""The DAG-side settings of task pods: the contract with the Helm chart, without importing Airflow.

The chart renders `helm/seamless-airflow/values.yaml` into the ConfigMap `seamless-dag-settings`, which
every Airflow container receives as the Airflow Variable `seamless_k8s` (env AIRFLOW_VAR_SEAMLESS_K8S),
JSON. Only names travel here (namespace, service account, Secret names, pool labels): never a credential.
"""

from __future__ import annotations

import json
import os
from typing import Any

SETTINGS_VARIABLE = "seamless_k8s"
ENV_VARIABLE = "AIRFLOW_VAR_SEAMLESS_K8S"
EXECUTION_ENV = "SEAMLESS_EXECUTION"  # "kubernetes" (pods) or "local" (the embedded default's twin)
POOL_KINDS = ("gpu", "cpu")
SHM_VOLUME = "dshm"
TMP_VOLUME = "tmp"  # the only writable local folder under readOnlyRootFilesystem (steps write to storage)


class SettingsError(ValueError):
    """The settings are missing or malformed: say which key and where they come from."""


def load_settings(raw: str | None = None) -> dict[str, Any]:
    """Parse the settings JSON (default: the environment the chart sets) and check the keys pods need."""
    raw = raw if raw is not None else os.environ.get(ENV_VARIABLE)
    if not raw:
        raise SettingsError(
            f"no task-pod settings: set the Airflow Variable {SETTINGS_VARIABLE} (the Helm chart does, through "
            f"{ENV_VARIABLE}) or run with {EXECUTION_ENV}=local"
        )
    try:
        settings = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{SETTINGS_VARIABLE} is not JSON: {exc}") from None
    missing = [k for k in ("namespace", "service_account", "image", *POOL_KINDS) if k not in settings]
    if missing:
        raise SettingsError(f"{SETTINGS_VARIABLE} lacks {', '.join(missing)}; re-render the chart's ConfigMap")
    return settings


def pod_template(settings: dict[str, Any], pool_kind: str, *, shm_size: str = "2Gi",
                 tmp_size: str = "1Gi") -> dict[str, Any]:
    """A Kubernetes Pod (as a dict) for one task: pool placement, identity, security, secret volumes.

    /dev/shm is a memory-backed emptyDir: torch's data loaders and shared tensors need more than the
    64 MiB a container gets by default. /tmp is an emptyDir too: the chart's container securityContext
    makes the root filesystem read-only (every plan step writes only to its storage layers, and scratch
    to /tmp; tests/reliability/test_secrets.py checks that), and the image has no other writable folder.
    """
    if pool_kind not in POOL_KINDS:
        raise SettingsError(f"unknown pool kind {pool_kind!r}: use one of {', '.join(POOL_KINDS)}")
    pool = settings[pool_kind]
    resources: dict[str, Any] = {}
    for key in ("limits", "requests"):
        if pool.get(key):
            resources[key] = dict(pool[key])
    volumes = [*settings.get("volumes", []), {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
               {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": tmp_size}}]
    mounts = [*settings.get("volume_mounts", []), {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
              {"name": TMP_VOLUME, "mountPath": "/tmp"}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": settings["namespace"], "labels": dict(settings.get("pod_labels", {}))},
        "spec": {
            "serviceAccountName": settings["service_account"],
            "automountServiceAccountToken": False,
            "priorityClassName": settings.get("priority_class"),
            "restartPolicy": "Never",
            "nodeSelector": dict(pool.get("node_selector", {})),
            "tolerations": list(pool.get("tolerations", [])),
            "securityContext": dict(settings.get("pod_security_context", {})),
            "imagePullSecrets": list(settings.get("image_pull_secrets", [])),
            "volumes": volumes,
            "containers": [
                {
                    "name": "base",
                    "image": settings["image"],
                    "imagePullPolicy": settings.get("image_pull_policy", "IfNotPresent"),
                    "env": list(settings.get("env", [])),
                    "volumeMounts": mounts,
                    "resources": resources,
                    "securityContext": dict(settings.get("container_security_context", {})),
                }
            ],
        },
    }
