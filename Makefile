# finetune-operator — every command a developer or CI needs.
#   make demo   the main job: a real fine-tune on a local control plane (no cluster needed)
#   make test   lint, types, import layers, CRD drift, and the whole test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The venv is rebuilt when any of these change. uv installs it from its cache under ~/.cache/finetune-operator/uv
# (hard links): only a machine's first run downloads torch (a few GB); a fresh checkout's venv takes under a
# minute, where pip took minutes (pip's cache stays empty against this machine's package index). Bytecode is
# compiled at install, as pip does: else every first import in the tests pays for it.
UV_VERSION := 0.13.9
VENV_INPUTS := operator/pyproject.toml trainer/pyproject.toml dev/assets/pyproject.toml dev/localcluster/pyproject.toml dev/devtools/pyproject.toml dev/testsupport/pyproject.toml dev/demo/pyproject.toml cli/pyproject.toml requirements-dev.txt constraints.txt
VENV_STAMP := $(VENV)/.installed-$(shell { echo $(UV_VERSION); cat $(VENV_INPUTS); } 2>/dev/null | sha256sum | cut -c1-16)
PYTEST_ARGS ?=
NODES ?= 1
CHART := charts/finetune-operator

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV_STAMP):
	@echo ">> installing the Python environment into $(VENV) with uv (a machine's first run downloads torch: a few GB)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "uv==$(UV_VERSION)"
	UV_CACHE_DIR="$(CACHE_HOME)/uv" $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) \
		-c constraints.txt -r requirements-dev.txt -e "./trainer[train,qlora]" -e ./operator -e ./dev/assets -e ./dev/localcluster -e ./dev/devtools -e ./dev/testsupport -e ./dev/demo -e ./cli
	@rm -f $(VENV)/.installed-*
	@touch $@

.PHONY: venv
venv: $(VENV_STAMP) ## create/refresh the Python environment

# Lint caches live outside the checkout, keyed by the Python version and the pinned tool versions,
# so a fresh clone (CI) reuses them: a cold `mypy --strict` takes minutes, a warm one seconds. Nothing
# is trusted blindly: mypy revalidates every cached module by its content hash (any checkout path).
CACHE_HOME := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/finetune-operator
LINT_CACHE = $(CACHE_HOME)/lint-$(shell { $(PY) --version; cat constraints.txt; } | sha256sum | cut -c1-16)
LINT_STEPS := lint-ruff lint-mypy lint-imports lint-drift lint-alerts chart-lint
LINT_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: lint $(LINT_STEPS)
lint: venv system-deps ## ruff, mypy --strict, import-linter contracts, CRD and docs drift, promtool on the alerts, helm lint of the chart
	@$(MAKE) --no-print-directory --keep-going -j$(LINT_JOBS) --output-sync=target $(LINT_STEPS)

lint-ruff:
	RUFF_CACHE_DIR=$(LINT_CACHE)/ruff $(VENV)/bin/ruff check .
	RUFF_CACHE_DIR=$(LINT_CACHE)/ruff $(VENV)/bin/ruff format --check .

lint-mypy:
	$(VENV)/bin/mypy --cache-dir $(LINT_CACHE)/mypy operator/src trainer/src dev/assets/src dev/localcluster/src dev/devtools/src dev/testsupport/src dev/demo/src cli/src

lint-imports:
	$(VENV)/bin/lint-imports --cache-dir $(LINT_CACHE)/import-linter

lint-drift:
	$(PY) -m finetune_operator.generators.crd --check
	$(PY) -m finetune_operator.controller.metrics --check

lint-alerts:
	promtool check rules charts/finetune-operator/files/alerts.yaml
	promtool test rules tests/alerts/alerts_test.yaml

.PHONY: helm
helm: venv ## build (or reuse the cached) helm from the Go module proxy; prints its path
	@$(PY) -m finetune_devtools helm

.PHONY: images
IMAGES ?= operator trainer
images: venv container-deps ## the operator and trainer images (podman; IMAGES=operator for one), tagged by a hash of their inputs
	@$(PY) -m finetune_devtools images $(IMAGES)

.PHONY: chart-lint
chart-lint: venv ## helm lint --strict + helm template over the chart's values matrix ($(CHART)/ci/)
	@helm="$$($(PY) -m finetune_devtools helm)" || exit 1; \
	for values in $(CHART)/ci/*-values.yaml; do \
	  out="$$("$$helm" lint --strict $(CHART) -f "$$values" 2>&1 && \
	         "$$helm" template lint-check $(CHART) -n finetune-system -f "$$values" 2>&1 >/dev/null)" || \
	    { echo "$$out"; echo "error: the chart fails helm lint/template with $$values"; exit 1; }; \
	  echo "helm lint + template ok: $$values"; \
	done

.PHONY: crds
crds: venv ## regenerate crds/ from the API models
	$(PY) -m finetune_operator.generators.crd

.PHONY: docs
docs: venv ## regenerate the metrics reference in docs/monitoring.md
	$(PY) -m finetune_operator.controller.metrics

.PHONY: system-deps
system-deps: ## Debian packages (Prometheus and promtool for the demo, the alert tests and the dashboard test)
	@dev/install-system-deps.sh

.PHONY: container-deps
container-deps: ## Debian packages for images and containers on the local node (podman, buildah, runc, mmdebstrap)
	@dev/install-system-deps.sh containers

.PHONY: test
test: lint controlplane system-deps container-deps ## everything CI runs: lint + unit + integration (real control plane) + end-to-end
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: unit
unit: venv ## only the fast tests (no control plane, no real weights)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

.PHONY: controlplane
controlplane: venv ## build (or reuse the cached) control-plane binaries
	$(PY) -m finetune_devtools build

.PHONY: cluster-up
cluster-up: venv ## start the local control plane + NODES nodes (default 1); kubeconfig path is printed
	$(PY) -m finetune_devtools up --nodes $(NODES)

.PHONY: s3-up
s3-up: venv ## start the S3 server (SeaweedFS, built once from the Go module proxy; auth on); prints S3_ENDPOINT and keys
	@$(PY) -m finetune_devtools s3-up

.PHONY: s3-down
s3-down: venv ## stop the S3 server started by make s3-up
	@$(PY) -m finetune_devtools s3-down

.PHONY: cluster-down
cluster-down: venv ## stop the local control plane
	$(PY) -m finetune_devtools down

.PHONY: kueue-up
kueue-up: venv ## Kueue (built from the Go module proxy once) against the running local cluster: CRDs + manager
	$(PY) -m finetune_devtools kueue-up

.PHONY: kueue-down
kueue-down: venv ## stop Kueue's manager (its CRDs and queues stay)
	$(PY) -m finetune_devtools kueue-down

.PHONY: demo
demo: venv controlplane system-deps ## the main job: fine-tune MiniLM-L6 end to end on the local control plane (~5 min)
	@echo ">> make demo: local control plane + operator + Prometheus, then a real fine-tune of MiniLM-L6"
	@echo "   (first run: builds the control plane, ~10-20 min; later runs: a few minutes)"
	$(PY) -m finetune_demo

.PHONY: demo-helm
demo-helm: venv controlplane system-deps container-deps ## as users install it: `make images`, `helm install` of the chart, the MiniLM job trained inside the trainer image
	@echo ">> make demo-helm: the images, the chart on a local control plane of its own, the job in the trainer image"
	@echo "   (first run: builds the ~6.6 GB trainer dependency image, ~15 min on 2 cores; later runs: minutes)"
	$(PY) -m finetune_demo --helm

.PHONY: demo-down
demo-down: venv ## stop what `make demo` and `make demo-helm` left running (operator, Prometheus, local clusters)
	$(PY) -m finetune_demo --down
	$(PY) -m finetune_demo --down --helm

.PHONY: clean
clean: ## remove the venv and caches inside the checkout (not ~/.cache/finetune-operator)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

.PHONY: mlflow-up mlflow-down
mlflow-up: venv ## an MLflow tracking server (SQLite, artifacts proxied) on 127.0.0.1:15500; prints MLFLOW_TRACKING_URI=... last
	@$(PY) -m finetune_devtools mlflow-up

mlflow-down: venv ## stop the server of `make mlflow-up` (its runs stay in the state dir)
	@$(PY) -m finetune_devtools mlflow-down
