"""Airflow plugin `seamless_links`: registers the step operators' "Neuroglancer" extra link.

The link itself lives on the operators (operators/links.py): Airflow 3 computes an operator's own links
on the worker when a try ends and the UI reads them back from XCom, so this registration is not what
makes the button appear. It lists the link under `airflow plugins`, as Airflow's extra-link guide does.
`NeuroglancerLink.operators` is left empty on purpose: a plugin link bound to operator classes would
replace the XCom value in the API server and be computed there, where the task's plan and the run's
Params are not at hand.
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin

from operators.links import NeuroglancerLink


class SeamlessLinksPlugin(AirflowPlugin):
    """Registers NeuroglancerLink (see the module docstring for why it binds to no operator class)."""

    name = "seamless_links"
    operator_extra_links: ClassVar[list[Any]] = [NeuroglancerLink()]
