# syntax=docker/dockerfile:1
# The Airflow image: the official Apache Airflow 3.3 image + the Kubernetes provider, the DAGs (baked in:
# the chart runs no git-sync), the operators and the torch-free core of seamless_core (the DAGs import its
# plan and config; torch lives only in the worker image).
#
#   docker build -f docker/airflow.Dockerfile -t REGISTRY/seamless-airflow:TAG .
#
# Keep AIRFLOW_IMAGE's Airflow version, the chart's airflow.airflowVersion and constraints.txt's
# apache-airflow pin equal: pip below pins apache-airflow to the image's own version, so a constraints
# file pinning another version fails the build instead of silently changing Airflow
# (tests/deploy/test_docker.py checks all three agree).

ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The official image runs as the `airflow` user (uid 50000), which owns AIRFLOW_HOME (/opt/airflow) and
# installs Python packages for itself. The source folder is made by that user, so pip can build in it.
# Dependencies layer: depends on pyproject.toml + constraints.txt only (empty stand-ins for the packages).
WORKDIR /opt/airflow
RUN mkdir -p seamless-src/seamless_core seamless-src/operators \
 && touch seamless-src/seamless_core/__init__.py seamless-src/operators/__init__.py
WORKDIR /opt/airflow/seamless-src
COPY --chown=airflow:0 pyproject.toml constraints.txt ./
# seamless:airflow-install (tests/deploy/test_docker.py parses this RUN)
RUN pip install --constraint constraints.txt "apache-airflow==${AIRFLOW_VERSION}" ".[airflow]"
# Code layer: seamless_core + operators without dependencies (torch is not installed here, on purpose).
COPY --chown=airflow:0 README.md ./
COPY --chown=airflow:0 seamless_core/ seamless_core/
COPY --chown=airflow:0 operators/ operators/
# pip check: constraints.txt must not have changed a package the official image's providers depend on.
RUN pip install --no-deps --force-reinstall . \
 && python -c "import seamless_core, operators" \
 && pip check
# DAGs last: a DAG edit rebuilds one tiny layer.
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
# Plugins: the section-block timetable (backfills) and the Neuroglancer extra link.
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
WORKDIR /opt/airflow
