"""Airflow operators: SeamlessPodOperator (a KubernetesPodOperator preset for GPU node pools) and its
local twin. Both run the same `seamless` step command; see the Airflow issue for their delivery."""

from .local import SeamlessLocalOperator, executor, gpu_pool, step_operator

__all__ = ["SeamlessLocalOperator", "SeamlessPodOperator", "executor", "gpu_pool", "step_operator"]


def __getattr__(name: str):  # the Kubernetes provider is imported only when the pod operator is asked for
    if name == "SeamlessPodOperator":
        from .pod import SeamlessPodOperator

        return SeamlessPodOperator
    raise AttributeError(name)
