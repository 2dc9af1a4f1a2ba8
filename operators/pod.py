"""SeamlessPodOperator: a KubernetesPodOperator preset that runs one `seamless` step on a node pool."""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

from .settings import load_settings, pod_template
from .step_args import checked_step, with_retry_defaults


class SeamlessPodOperator(KubernetesPodOperator):
    """Run `seamless <step args>` in the worker image on the GPU (or CPU) pool.

    The step is an argument list, never a shell string (the image's ENTRYPOINT is `seamless`). Placement,
    identity, security contexts and secret volumes come from the chart's settings (operators.settings),
    read when the task runs unless given; logs stream into the task log; pods are deleted when done;
    preempted pods are retried with exponential backoff.
    """

    def __init__(self, *, step: list[str], pool_kind: str = "gpu", settings: dict[str, Any] | None = None,
                 shm_size: str = "2Gi", **kwargs: Any) -> None:
        step = checked_step(step)
        with_retry_defaults(kwargs, retries=4)
        super().__init__(
            name=f"seamless-{step[0]}",
            arguments=list(step),
            get_logs=True,
            do_xcom_push=False,
            on_finish_action="delete_pod",
            random_name_suffix=True,
            **kwargs,
        )
        self.step = list(step)
        self.pool_kind = pool_kind
        self.shm_size = shm_size
        if settings is not None:
            self.pod_template_dict = pod_template(settings, pool_kind, shm_size=shm_size)

    def execute(self, context: Any) -> Any:
        if self.pod_template_dict is None:  # read at run time, not at DAG parse time
            self.pod_template_dict = pod_template(load_settings(), self.pool_kind, shm_size=self.shm_size)
        return super().execute(context)
