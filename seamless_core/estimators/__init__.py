"""Field estimators (block matching, the online finetuner, the learned pyramid) and the stage spec.

Each estimator is a small module usable on two tensors without storage (see base.Pair); `spec` lets a
user choose estimators per MIP stage, coarse to fine.
"""

from typing import Any

__all__ = ["Estimator", "Pair"]


def __getattr__(name: str) -> Any:
    """Lazy: the stage spec is validated at DAG parse time, where importing torch would cost ~1.5 s."""
    if name in __all__:
        from . import base

        return getattr(base, name)
    raise AttributeError(name)
