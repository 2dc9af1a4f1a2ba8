"""Field estimators (block matching, the online finetuner, the learned pyramid) and the stage spec.

Each estimator is a small module usable on two tensors without storage (see base.Pair); `spec` lets a
user choose estimators per MIP stage, coarse to fine.
"""

from .base import Estimator, Pair

__all__ = ["Estimator", "Pair"]
