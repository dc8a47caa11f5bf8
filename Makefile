# kubeforge — the verbs. Every target sets up what it needs on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export KUBEFORGE_CACHE ?= $(HOME)/.cache/kubeforge
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: help install host-packages tools images crds cluster-up cluster-down cluster-status demo demo-flywheel test test-unit test-cluster test-runtime test-realpods bench-trainer bench-checkpoint bench-serving bench-serving-text bench-operator bench-e2e bench-store-outage bench-flywheel lint kind-up kind-down

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# what `install` must leave importable; a venv that lacks one (an install that failed half-way,
# a venv copied from another checkout) is installed again
IMPORTS := kubeforge kubeforge_runtime kopf torch pytest
export CHECK_IMPORTS := import importlib.util as u, sys; m = [n for n in sys.argv[1:] if u.find_spec(n) is None]; \
  sys.exit("install: the venv lacks " + ", ".join(m) if m else 0)

install: $(STAMP) ## create .venv and install kubeforge with all extras (quick when done)
	@$(PY) -c "$$CHECK_IMPORTS" $(IMPORTS) 2>/dev/null || { rm -f $(STAMP); $(MAKE) --no-print-directory $(STAMP); }

$(STAMP): pyproject.toml
	@set -e; t0=$$SECONDS; \
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	echo "install: $$(df -h --output=avail . | tail -1 | tr -d ' ') free on $$(df --output=target . | tail -1)"; \
	$(PY) -m pip install -q --upgrade pip >/dev/null; \
	$(PY) -m pip install -q -e '.[operator,runtime,dev]' \
	  || { echo "install: pip failed (exit $$?); free space: $$(df -h --output=avail . | tail -1)" >&2; exit 1; }; \
	$(PY) -c "$$CHECK_IMPORTS" $(IMPORTS); \
	rm -f $(VENV)/.installed-*; touch $@; \
	echo "install: $$((SECONDS - t0))s"

host-packages: ## runc, CNI plugins, iptables, conntrack, podman, debootstrap (Debian packages, when missing)
	@hack/cluster/host-packages.sh

tools: host-packages ## build the control plane, kubelet, containerd, CoreDNS, kwok, MinIO, kubectl and helm from Go modules (cached)
	@t0=$$SECONDS; hack/cluster/build.sh && echo "tools: $$((SECONDS - t0))s"

images: install tools ## build our images with podman (cached by input hash) and import them into the real nodes
	@t0=$$SECONDS; $(PY) hack/cluster/devcluster.py images && echo "images: $$((SECONDS - t0))s"

crds: install ## render crds/*.yaml from the API models
	$(VENV)/bin/kubeforge-crds --out crds --out charts/kubeforge/crds --reference docs/reference.md

cluster-up: install tools ## start the local control plane (a no-op when it runs)
	@t0=$$SECONDS; $(PY) hack/cluster/devcluster.py up && echo "cluster-up: $$((SECONDS - t0))s"

cluster-down: ## stop the local control plane, leaving no process behind
	@if [ -x $(PY) ]; then $(PY) hack/cluster/devcluster.py down; fi

cluster-status: install ## show the local control plane's processes
	@$(PY) hack/cluster/devcluster.py status

demo: cluster-up ## the whole loop on real pods: images, helm install, train, serve, answer
	@hack/demo.sh

demo-flywheel: cluster-up ## the data flywheel on real pods: captured traffic + feedback -> curated Dataset -> fine-tune, and PSI under shifted traffic
	@hack/demo-flywheel.sh

test: install tools ## the whole suite (starts the local cluster itself; builds the images first, cached)
	@t0=$$SECONDS; $(PY) hack/cluster/images.py build >/dev/null && echo "images: $$((SECONDS - t0))s" || echo "images: the build failed after $$((SECONDS - t0))s; the real-pod tests say why"
	@t0=$$SECONDS; $(PY) -m pytest tests; rc=$$?; echo "tests: $$((SECONDS - t0))s"; exit $$rc

test-unit: install tools ## only the unit tests (a few start MinIO or run helm template)
	$(PY) -m pytest tests/unit

test-cluster: install tools ## only the tests against the local control plane (incl. the pod-contract e2e tests)
	$(PY) -m pytest tests/cluster tests/e2e

test-runtime: install tools ## only the torch tests (trainer, checkpoints, server) on the CPU
	$(PY) -m pytest tests/runtime

test-realpods: install tools ## only the tests on the real nodes (builds and imports the images first)
	$(PY) -m pytest tests/realpods

lint: install ## ruff on the Python, shellcheck on the scripts, mypy --strict on both packages
	$(VENV)/bin/ruff check operator trainer_image tests bench hack
	$(VENV)/bin/shellcheck -x hack/*.sh hack/cluster/*.sh .ci/run
	$(PY) -m mypy --strict operator/kubeforge trainer_image/kubeforge_runtime

kind-up: install ## for users with Docker: a kind cluster with a fake GPU node, the chart and the examples
	hack/kind-up.sh

kind-down: ## delete the kind cluster made by kind-up
	hack/kind-down.sh

bench-trainer: install ## trainer throughput vs a bare loop, DDP and FSDP2 on CPU -> bench/results/trainer.json
	$(PY) bench/trainer.py

bench-checkpoint: install tools ## DCP save/restore, async blocking, disk and S3 throughput -> bench/results/checkpoint.json
	$(PY) bench/checkpoint.py

bench-serving: install ## engine vs naive generate and transformers' continuous batching -> bench/results/serving.json
	$(PY) bench/serving.py

bench-serving-text: install ## the engine thread's text work per token, before/after incremental detokenization -> bench/results/serving_text.json
	$(PY) bench/serving_text.py

bench-operator: install tools ## 200 TrainingJobs on 100 fake GPU nodes -> bench/results/operator.json
	$(PY) bench/operator_scale.py

bench-e2e: install tools ## apply -> train -> serve -> answer, node loss, image builds, on real pods -> bench/results/e2e.json
	$(PY) bench/e2e.py

bench-flywheel: install ## capture overhead, router split error and shadow overhead, dedup precision/recall, curation of 100k records, PSI on shifted traffic -> bench/results/flywheel.json
	$(PY) bench/flywheel.py

bench-store-outage: install tools ## node loss of a job without S3 while 30 jobs' S3 is dead, this operator vs BEFORE (a revision) -> bench/results/store_outage.json
	$(PY) bench/store_outage.py $(if $(BEFORE),--before $(BEFORE))
