"""Estimator parameters as pydantic models: one place that validates them and says what is wrong.

An estimator's parameters come from a project's stage spec (YAML), the CLI or Python. A bad value is
refused with `ValueError("<name> must be <rule>, got <value>")`, where the rule comes from the model's
own constraints, and an unknown name with `TypeError`, as a wrong keyword argument would be. The
stage spec turns both into an InputError that names the estimator.
"""

from __future__ import annotations

from typing import Any, Literal, Self, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _rule(field: FieldInfo) -> str:
    """What a field accepts, in words: 'an integer >= 8', 'a finite number > 0 and <= 1', 'one of (...)'."""
    if get_origin(field.annotation) is Literal:
        return f"one of {get_args(field.annotation)}"
    finite = not any(getattr(m, "allow_inf_nan", None) is True for m in field.metadata)
    kind = "an integer" if field.annotation is int else ("a finite number" if finite else "a number")
    bounds = [f"{sign} {getattr(m, attr)}" for m in field.metadata for attr, sign in _BOUNDS
              if getattr(m, attr, None) is not None]
    text = kind + (" " + " and ".join(bounds) if bounds else "")
    return f"{text} ({field.description})" if field.description else text


class EstimatorParams(BaseModel):
    """Strict (no bool for an int, no string for a number), finite unless a field allows inf, frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    @classmethod
    def checked(cls, values: dict[str, Any]) -> Self:
        """The validated parameters, or the first problem as ValueError/TypeError naming the parameter."""
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            if not error["loc"]:  # a check across fields: its message names the parameter itself
                raise ValueError(str(error.get("ctx", {}).get("error", error["msg"]))) from None
            name = str(error["loc"][0])
            if error["type"] == "extra_forbidden":
                raise TypeError(f"unknown parameter {name!r}; known: {', '.join(cls.model_fields)}") from None
            raise ValueError(f"{name} must be {_rule(cls.model_fields[name])}, got {values[name]!r}") from None
