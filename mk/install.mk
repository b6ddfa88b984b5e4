# Install paths (see docs/install.md). Included by the top-level Makefile.
#
#   make manifests        regenerate manifests/install.yaml from helm/mpnn-operator
#                         (Helm renders it, through the helm-python-sdk dev dependency)
#   make manifests-check  fail if manifests/install.yaml or the chart's CRD copies are stale
#   make chart-crds       copy crds/*.yaml into helm/mpnn-operator/crds/
#   make test-install     the chart, manifest and RBAC tests only

PYTHON ?= .venv/bin/python
CHART_DIR := helm/mpnn-operator

.PHONY: manifests manifests-check chart-crds test-install

chart-crds:
	rm -f $(CHART_DIR)/crds/*.yaml
	cp crds/*.yaml $(CHART_DIR)/crds/

manifests: install chart-crds
	$(PYTHON) hack/gen_install.py

manifests-check: install
	diff -r crds $(CHART_DIR)/crds
	$(PYTHON) hack/gen_install.py --check

test-install: install
	$(PYTHON) -m pytest tests/cluster/test_helm.py tests/cluster/test_install.py $(PYTEST_ARGS)
