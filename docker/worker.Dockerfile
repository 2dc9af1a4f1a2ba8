# syntax=docker/dockerfile:1
# The SEAMLeSS worker image: CUDA build of torch + seamless_core; every task pod runs it (`seamless STEP ...`).
#
#   docker build -f docker/worker.Dockerfile -t REGISTRY/seamless-worker:TAG .
#
# Layers: `deps` holds every third-party package and depends only on pyproject.toml + constraints.txt, so a
# code change reuses it and rebuilds only the last, small layer (seconds, and a push of a few hundred kB).
# The install command is the project's own (scripts/setup.sh: pip install --constraint constraints.txt
# ".[EXTRAS]"); tests/deploy/test_docker.py reads it from this file and proves it resolves.
#
# torch: constraints.txt pins torch==2.13.0; the CUDA wheel index serves 2.13.0+cu129, which satisfies
# that pin. Its kernels cover T4 (sm_75) and L4 (sm_89), and CUDA 12.9 runs on any R525+ driver (CUDA
# minor-version compatibility; GKE's gpu-driver-version=latest is newer). Other builds:
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 (needs an R580+ driver),
# .../whl/cpu for a CPU-only image, or an empty value for PyPI's default build (CUDA 13).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu129
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt ./
# Empty stand-ins for the packages, so installing the project's dependencies needs no project code.
RUN mkdir seamless_core operators && touch seamless_core/__init__.py operators/__init__.py
# seamless:worker-install (tests/deploy/test_docker.py parses this RUN)
RUN python -m pip install --upgrade "pip>=24" \
 && python -m pip install --constraint constraints.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[worker]" \
 && python -m pip uninstall --yes seamless-airflow \
 && python -m pip check

FROM deps AS wheel
COPY README.md ./
COPY seamless_core/ seamless_core/
# operators/ (Airflow side) stays out of the worker.
RUN rm -rf operators && python -m pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="seamless-worker" \
      org.opencontainers.image.description="SEAMLeSS alignment steps (seamless CLI) with CUDA torch"
# LD_LIBRARY_PATH: GKE mounts the NVIDIA driver libraries under /usr/local/nvidia. NVIDIA_*: the NVIDIA
# container toolkit (EKS, on-prem) injects the driver into containers that set them.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# The uid must match helm values worker.uid (task pods run as it; tests/deploy checks they agree).
RUN groupadd --gid 10001 seamless \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/seamless --shell /usr/sbin/nologin seamless
COPY --from=deps /opt/venv /opt/venv
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels \
    python -m pip install --no-deps /tmp/wheels/*.whl
USER 10001:10001
WORKDIR /home/seamless
# CloudVolume reads credentials from $HOME/.cloudvolume/secrets (google-secret.json, aws-secret.json);
# the chart projects the Kubernetes Secrets there.
RUN mkdir -p /home/seamless/.cloudvolume/secrets
ENTRYPOINT ["seamless"]
CMD ["--help"]
