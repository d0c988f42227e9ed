# finetune-operator — every command a developer or CI needs.
#   make demo   the main job: a real fine-tune on a local control plane (no cluster needed)
#   make test   lint, types, import layers, CRD drift, and the whole test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The venv is rebuilt when any of these change; pip's cache keeps re-installs cheap.
VENV_INPUTS := operator/pyproject.toml trainer/pyproject.toml dev/pyproject.toml cli/pyproject.toml requirements-dev.txt constraints.txt
VENV_STAMP := $(VENV)/.installed-$(shell cat $(VENV_INPUTS) 2>/dev/null | sha256sum | cut -c1-16)
PYTEST_ARGS ?=
CHART := charts/finetune-operator

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV_STAMP):
	@echo ">> installing the Python environment into $(VENV) (first run downloads torch: a few GB, cached by pip)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-dev.txt \
		-e "./trainer[train]" -e ./operator -e ./dev -e ./cli
	@rm -f $(VENV)/.installed-*
	@touch $@

.PHONY: venv
venv: $(VENV_STAMP) ## create/refresh the Python environment

.PHONY: lint
lint: venv system-deps ## ruff, mypy --strict, import-linter contracts, CRD and docs drift, promtool on the alerts, helm lint of the chart
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy operator/src trainer/src dev/src cli/src
	$(VENV)/bin/lint-imports
	$(PY) -m finetune_operator.crd --check
	$(PY) -m finetune_operator.metrics --check
	promtool check rules charts/finetune-operator/files/alerts.yaml
	promtool test rules tests/alerts/alerts_test.yaml
	@$(MAKE) --no-print-directory chart-lint

.PHONY: helm
helm: venv ## build (or reuse the cached) helm from the Go module proxy; prints its path
	@$(PY) -m finetune_localcluster helm

.PHONY: images
IMAGES ?= operator trainer
images: venv container-deps ## the operator and trainer images (podman; IMAGES=operator for one), tagged by a hash of their inputs
	@$(PY) -m finetune_localcluster images $(IMAGES)

.PHONY: chart-lint
chart-lint: venv ## helm lint --strict + helm template over the chart's values matrix ($(CHART)/ci/)
	@helm="$$($(PY) -m finetune_localcluster helm)" || exit 1; \
	for values in $(CHART)/ci/*-values.yaml; do \
	  out="$$("$$helm" lint --strict $(CHART) -f "$$values" 2>&1 && \
	         "$$helm" template lint-check $(CHART) -n finetune-system -f "$$values" 2>&1 >/dev/null)" || \
	    { echo "$$out"; echo "error: the chart fails helm lint/template with $$values"; exit 1; }; \
	  echo "helm lint + template ok: $$values"; \
	done

.PHONY: crds
crds: venv ## regenerate crds/ from the API models
	$(PY) -m finetune_operator.crd

.PHONY: docs
docs: venv ## regenerate the metrics reference in docs/monitoring.md
	$(PY) -m finetune_operator.metrics

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
	$(PY) -m finetune_localcluster build

.PHONY: cluster-up
cluster-up: venv ## start the local control plane + node; kubeconfig path is printed
	$(PY) -m finetune_localcluster up

.PHONY: cluster-down
cluster-down: venv ## stop the local control plane
	$(PY) -m finetune_localcluster down

.PHONY: kueue-up
kueue-up: venv ## Kueue (built from the Go module proxy once) against the running local cluster: CRDs + manager
	$(PY) -m finetune_localcluster kueue-up

.PHONY: kueue-down
kueue-down: venv ## stop Kueue's manager (its CRDs and queues stay)
	$(PY) -m finetune_localcluster kueue-down

.PHONY: demo
demo: venv controlplane system-deps ## the main job: fine-tune MiniLM-L6 end to end on the local control plane (~5 min)
	@echo ">> make demo: local control plane + operator + Prometheus, then a real fine-tune of MiniLM-L6"
	@echo "   (first run: builds the control plane, ~10-20 min; later runs: a few minutes)"
	$(PY) -m finetune_demo

.PHONY: demo-down
demo-down: venv ## stop what `make demo` left running (operator, Prometheus, local cluster)
	$(PY) -m finetune_demo --down

.PHONY: clean
clean: ## remove the venv and caches inside the checkout (not ~/.cache/finetune-operator)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
