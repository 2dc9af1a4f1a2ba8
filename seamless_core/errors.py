"""Errors that a user can act on, each with the exit code the CLI returns for it.

Exit codes are part of the interface: Airflow retries only what can succeed on retry
(storage trouble), and fails fast on bad input.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of `seamless`; documented in docs/cli.md."""

    OK = 0
    INTERNAL = 1  # a bug: the traceback is printed
    USAGE = 2  # bad command line (click's own code)
    INVALID_INPUT = 3  # layers, bounding boxes, configs that cannot work; retrying will not help
    STORAGE = 4  # storage still failing after retries; a retry of the task may help
    INTERRUPTED = 130  # SIGINT / SIGTERM


class SeamlessError(Exception):
    """Base of the errors the CLI reports as one clear line instead of a traceback."""

    exit_code: ExitCode = ExitCode.INTERNAL


class InputError(SeamlessError, ValueError):
    """The request cannot work as given: say what is wrong and how to fix it."""

    exit_code = ExitCode.INVALID_INPUT


class LayerError(InputError):
    """A layer is missing or does not have the dtype, channels, resolution or metadata a step needs."""


class DisplacementTooLarge(InputError):
    """A field moves pixels further than the render is allowed to reach; never silently clipped."""


class StorageError(SeamlessError):
    """Reading or writing storage failed after retries."""

    exit_code = ExitCode.STORAGE


class Interrupted(SeamlessError):
    """SIGINT or SIGTERM (a preempted pod): finished chunks are kept; a rerun continues."""

    exit_code = ExitCode.INTERRUPTED
