# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t finetune-operator:0.1.0 .
#   docker build --target trainer  -t finetune-trainer:0.1.0 .
# (the trainer target builds its trainer-deps stage first; docker's layer cache keeps it)
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
# the test suites that packages ship. The operator is the base plus one layer; the trainer is the
# base, one dependency layer (~6 GB, rebuilt only when constraints.txt or the trainer's pyproject
# change) and one thin layer with the trainer package.
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

# The trainer's dependencies (torch + transformers + peft + datasets, several GB) in a stage of
# their own, built from constraints.txt and the trainer's pyproject only: a change to the
# trainer's code rebuilds just the thin layer below, in seconds. pip stays (the layer below
# installs with it); the trainer package itself is uninstalled again here.
FROM base AS trainer-deps
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
RUN --mount=type=bind,target=/mnt/context \
    mkdir /tmp/src && cp -r /mnt/context/constraints.txt /mnt/context/trainer /tmp/src/ \
 && python3 -m venv /opt/venv \
 && pip install -c /tmp/src/constraints.txt "/tmp/src/trainer[train,qlora]" \
 && pip uninstall --yes finetune-trainer && rm -rf /tmp/src \
 && find /opt/venv/lib -depth -type d -name tests -path '*/site-packages/*/tests' -exec rm -rf {} +

# The trainer: its dependencies plus the trainer package, nothing else. `make images` replaces the
# stage above with its cached image (--build-context trainer-deps=container-image://...).
FROM trainer-deps AS trainer
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
RUN --mount=type=bind,target=/mnt/context \
    mkdir /tmp/src && cp -r /mnt/context/trainer /tmp/src/ \
 && pip install --no-deps /tmp/src/trainer && rm -rf /tmp/src
ENV HF_HOME=/tmp/hf-home
USER 65532:65532
EXPOSE 9400
ENTRYPOINT ["finetune-trainer"]
