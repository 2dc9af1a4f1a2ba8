"""Which storage errors are worth retrying, for seamless_core.volumes and for the cloud-files client below it.

Why: cloud-files retries every GCS error except NotFound, up to 7 times with random exponential waits of up
to a minute, so a permanent refusal (403: no permission) took 15-60 s per chunk (measured: 14.5 s, then a
traceback) before a step failed. A 4xx other than 408 and 429 will not change on retry: it now fails at once
and is reported naming the layer, the region and the object (tests/reliability/test_storage_faults.py).
Transient faults (408, 429, 5xx, dropped connections) keep cloud-files' and google-cloud-storage's own
backoff, with seamless_core.volumes.with_retries on top.
"""

from __future__ import annotations

import http.client
from urllib.parse import unquote, urlsplit

import requests
import urllib3
from google.api_core import exceptions as google_errors
from tenacity import retry_all, retry_if_exception

TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.Timeout,
    urllib3.exceptions.ProtocolError,
    http.client.IncompleteRead,
)


def is_permanent(exc: BaseException) -> bool:
    """An HTTP client error (4xx) other than 408 and 429: the store refused the request as such."""
    return isinstance(exc, google_errors.ClientError) and exc.code not in TRANSIENT_STATUS


def object_name(exc: BaseException) -> str | None:
    """The object a failed GCS request named in its URL (downloads, metadata), if any."""
    response = getattr(exc, "response", None)
    url = getattr(response, "url", None) or getattr(getattr(response, "request", None), "url", None)
    if not url:
        return None
    path = urlsplit(str(url)).path
    return unquote(path.split("/o/", 1)[1]) if "/o/" in path else None


def _no_permanent(exc: BaseException) -> bool:
    return not is_permanent(exc)


def fail_fast_in_cloudfiles() -> None:
    """Make every retrying method of cloud-files' GCS interface give up at once on a permanent error.

    Uses tenacity's own `retry_with` on the decorated methods: their retry condition becomes "the old
    condition and not permanent"; waits and attempt counts stay cloud-files' own. Idempotent.
    """
    from cloudfiles.interfaces import GoogleCloudStorageInterface as gcs

    if getattr(gcs, "_seamless_fail_fast", False):
        return
    for name, method in list(vars(gcs).items()):
        retrying = getattr(method, "retry", None)
        if retrying is None or not hasattr(method, "retry_with"):
            continue
        condition = retry_all(retrying.retry, retry_if_exception(_no_permanent))
        setattr(gcs, name, method.retry_with(retry=condition))
    gcs._seamless_fail_fast = True
