"""SeamlessPodOperator: a KubernetesPodOperator preset that runs one `seamless` step on a node pool."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.callbacks import KubernetesPodOperatorCallback
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException, TaskDeferred

from .figures import StepFigures
from .links import NeuroglancerLink
from .local import EXIT_MEANING, NOT_RETRIED, SeamlessLocalOperator
from .settings import load_settings, pod_template
from .step_args import checked_step, with_retry_defaults

if TYPE_CHECKING:
    from kubernetes.client import models as k8s

    from .local import PlanStepRef


def container_exit_code(pod: k8s.V1Pod | None, container: str) -> int | None:
    """The exit code of `container` in `pod` once it has terminated; None while it runs or when unknown."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    status = next((s for s in statuses if s.name == container), None)
    terminated = status.state.terminated if status is not None and status.state else None
    return terminated.exit_code if terminated is not None else None


def _last_line(pod: k8s.V1Pod | None, container: str) -> str:
    """The container's termination message, last non-empty line (with FallbackToLogsOnError: its last log line)."""
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    status = next((s for s in statuses if s.name == container), None)
    terminated = status.state.terminated if status is not None and status.state else None
    message = (terminated.message or "") if terminated is not None else ""
    return next((line.strip() for line in reversed(message.splitlines()) if line.strip()), "")


_FIGURES: dict[tuple[str, str], StepFigures] = {}  # (namespace, pod name) -> its step reports, until taken


class StepFigureCallback(KubernetesPodOperatorCallback):
    """Reads the step reports off the log lines the provider streams (operators.figures); the provider
    calls its callbacks as static methods, so the figures wait here, keyed by pod, for the operator."""

    container = "base"

    @staticmethod
    def progress_callback(*, line: str, container_name: str, pod: k8s.V1Pod, **kwargs: Any) -> None:
        if container_name == StepFigureCallback.container and pod is not None and pod.metadata is not None:
            key = (pod.metadata.namespace or "", pod.metadata.name or "")
            _FIGURES.setdefault(key, StepFigures()).feed(line)


def take_figures(namespace: str | None, name: str | None) -> dict[str, Any] | None:
    """The XCom value of the pod's step reports (None if it printed none); forgets them."""
    figures = _FIGURES.pop((namespace or "", name or ""), None)
    return figures.xcom() if figures is not None else None


class SeamlessPodOperator(KubernetesPodOperator):
    """Run `seamless <step args>` in the worker image on the GPU (or CPU) pool.

    The step is an argument list, never a shell string (the image's ENTRYPOINT is `seamless`). Placement,
    identity, security contexts and secret volumes come from the chart's settings (operators.settings),
    read when the pod is built unless given; with a `plan_ref` the arguments are re-derived from the run's
    Params at that moment, exactly as the local twin does. Logs stream into the task log; pods are deleted
    when done; a failed pod is retried with exponential backoff, except exit 2 (usage) and 3 (bad input),
    which fail the task at once like the local twin (retrying cannot help).
    """

    operator_extra_links = (NeuroglancerLink(),)

    def __init__(self, *, step: list[str], pool_kind: str = "gpu", settings: dict[str, Any] | None = None,
                 shm_size: str = "2Gi", plan_ref: PlanStepRef | None = None, **kwargs: Any) -> None:
        step = checked_step(step)
        with_retry_defaults(kwargs, retries=4)
        kwargs.setdefault("termination_message_policy", "FallbackToLogsOnError")  # seamless's last line in the error
        subcommand = SeamlessLocalOperator.subcommand(step) or step[0]
        super().__init__(
            name=self._set_name(f"seamless-{subcommand}"),  # not "--marker": argv starts with marker options
            arguments=list(step),
            get_logs=True,
            do_xcom_push=False,  # no sidecar nor pods/exec (docs/deploy.md): the figures come from the log
            on_finish_action="delete_pod",
            random_name_suffix=True,
            callbacks=[*(kwargs.pop("callbacks", None) or []), StepFigureCallback],
            **kwargs,
        )
        self.step = list(step)
        self.pool_kind = pool_kind
        self.shm_size = shm_size
        self.plan_ref = plan_ref
        if settings is not None:
            self.pod_template_dict = pod_template(settings, pool_kind, shm_size=shm_size)

    def resolved_step(self, context: Any) -> list[str]:
        """The step's argv for this run: from the run's Params when the task has a plan_ref (local twin's rule)."""
        if self.plan_ref is None:
            return list(self.step)
        params = context.get("params") if hasattr(context, "get") else None
        return self.plan_ref.argv(params)

    def execute(self, context: Any) -> dict[str, Any] | None:
        """Run the pod (KubernetesPodOperator); return the steps' figures read off its log as the task's XCom."""
        try:
            super().execute(context)
        finally:  # taken even when the pod failed, so that nothing is left behind
            meta = self.pod.metadata if self.pod is not None else None
            figures = take_figures(meta.namespace, meta.name) if meta is not None else None
        return figures

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> dict[str, Any] | None:
        """The deferrable path's end: as execute, the figures read off the log it fetched."""
        try:
            super().trigger_reentry(context, event)
        except TaskDeferred:  # deferred again (the trigger gave up while the pod runs): more reports to come
            raise
        except BaseException:
            take_figures(event.get("namespace"), event.get("name"))
            raise
        return take_figures(event.get("namespace"), event.get("name"))

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        """The pod for this try: settings read now (not at parse time), argv from this run's Params.

        Both the sync and the deferrable paths of KubernetesPodOperator build the pod here, so the pod
        always runs what the local twin would run for the same Params.
        """
        if self.pod_template_dict is None:
            self.pod_template_dict = pod_template(load_settings(), self.pool_kind, shm_size=self.shm_size)
        if context is not None:
            self.arguments = self.resolved_step(context)
        return super().build_pod_request_obj(context, dry_run=dry_run)

    def cleanup(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, xcom_result: dict | None = None,
                context: Any = None) -> None:
        """KubernetesPodOperator's cleanup (delete the pod, raise if it failed), plus seamless's exit codes.

        The provider raises a plain AirflowException for any failed pod, which Airflow retries. Exit 2
        (usage) and 3 (bad input) cannot get better on a retry, so they become AirflowFailException.
        """
        code = container_exit_code(remote_pod, self.base_container_name)
        try:
            super().cleanup(pod=pod, remote_pod=remote_pod, xcom_result=xcom_result, context=context)
        except (AirflowFailException, AirflowSkipException):
            raise
        except AirflowException as exc:
            if code not in NOT_RETRIED:
                raise
            raise AirflowFailException(self.exit_message(code, remote_pod)) from exc

    def exit_message(self, code: int, remote_pod: k8s.V1Pod | None) -> str:
        """`seamless vote exited with code 3 (bad input) in pod NS/NAME, not retried: <its last line>`."""
        meaning = NOT_RETRIED.get(code) or EXIT_MEANING.get(code, "failed")
        meta = remote_pod.metadata if remote_pod is not None else None
        where = f"{meta.namespace}/{meta.name}" if meta is not None else "?"
        subcommand = SeamlessLocalOperator.subcommand(list(self.arguments or self.step)) or "step"
        message = f"seamless {subcommand} exited with code {code} ({meaning}) in pod {where}, not retried"
        last = _last_line(remote_pod, self.base_container_name)
        return f"{message}: {last}" if last else message
