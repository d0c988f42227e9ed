# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t finetune-operator:0.1.0 .
#   docker build --target trainer  -t finetune-trainer:0.1.0 .
# (`make images` builds both with podman, tagged by a content hash of their inputs.)
# Both run as a non-root user with a read-only root filesystem in mind (writable paths are
# volumes: /tmp, the output volume, the HF cache).
#
# BASE: any Debian-like image with python3 (3.11+) and its venv module. Offline, `make images`
# builds one with mmdebstrap. PIP_NO_INDEX / PIP_FIND_LINKS (unset by default) let an air-gapped
# build install from a directory of wheels mounted into the build.
#
# Lean by construction: the sources are bind-mounted into the one RUN that installs them. Only the
# packages are copied to /tmp first (pip builds in the source tree, some builders write a bind mount
# through, and a bind mount ignores .dockerignore: the whole context would bring a checkout's .venv).
# pip keeps no cache and is removed afterwards, the base has no compilers, and the trainer drops
# the test suites that packages ship. Each image is the base plus one layer,
# so building the ~6 GB trainer never holds a second copy of its virtualenv.
ARG BASE=python:3.11-slim

FROM ${BASE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN groupadd --gid 65532 finetune \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin finetune
WORKDIR /tmp

# The operator: no torch, small.
FROM base AS operator
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
RUN --mount=type=bind,target=/mnt/context \
    mkdir /tmp/src && cp -r /mnt/context/constraints.txt /mnt/context/trainer /mnt/context/operator /tmp/src/ \
 && python3 -m venv /opt/venv \
 && pip install -c /tmp/src/constraints.txt /tmp/src/trainer /tmp/src/operator \
 && pip uninstall --yes pip && rm -rf /tmp/src
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["finetune-operator"]
CMD ["run", "--log-format", "json"]

# The trainer: torch + transformers + peft + datasets.
FROM base AS trainer
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
RUN --mount=type=bind,target=/mnt/context \
    mkdir /tmp/src && cp -r /mnt/context/constraints.txt /mnt/context/trainer /tmp/src/ \
 && python3 -m venv /opt/venv \
 && pip install -c /tmp/src/constraints.txt "/tmp/src/trainer[train]" \
 && pip uninstall --yes pip && rm -rf /tmp/src \
 && find /opt/venv/lib -depth -type d -name tests -path '*/site-packages/*/tests' -exec rm -rf {} +
ENV HF_HOME=/tmp/hf-home
USER 65532:65532
EXPOSE 9400
ENTRYPOINT ["finetune-trainer"]
