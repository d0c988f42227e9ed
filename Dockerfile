# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t finetune-operator:0.1.0 .
#   docker build --target trainer  -t finetune-trainer:0.1.0 .
# Both run as a non-root user with a read-only root filesystem in mind (writable paths are
# volumes: /tmp, the output volume, the HF cache).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 65532 --create-home --shell /usr/sbin/nologin finetune
WORKDIR /app

# The operator: no torch, small.
FROM base AS operator
COPY constraints.txt ./
COPY trainer/pyproject.toml trainer/pyproject.toml
COPY trainer/src trainer/src
COPY operator/pyproject.toml operator/pyproject.toml
COPY operator/src operator/src
RUN pip install -c constraints.txt ./trainer ./operator
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["finetune-operator"]
CMD ["run", "--all-namespaces", "--log-format", "json"]

# The trainer: torch + transformers + peft + datasets.
FROM base AS trainer
COPY constraints.txt ./
COPY trainer/pyproject.toml trainer/pyproject.toml
COPY trainer/src trainer/src
RUN pip install -c constraints.txt "./trainer[train]"
ENV HF_HOME=/tmp/hf-home
USER 65532:65532
EXPOSE 9400
ENTRYPOINT ["finetune-trainer"]
