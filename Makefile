# mpnn — see README.md. `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench protos clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/mpnn run examples/digits.yaml

# lint-imports first: the layer contracts in pyproject.toml ([tool.importlinter]).
test: install k8s-binaries e2e-prereqs
	$(VENV)/bin/lint-imports
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# Data-plane tests only: no control plane needed.
test-fast: install
	$(VENV)/bin/lint-imports
	$(PYTHON) -m pytest -m 'not k8s' $(PYTEST_ARGS)

bench: install
	$(PYTHON) bench/engine.py

# Regenerate the gRPC stubs after editing partition_server/api/protos/*.proto.
protos: install
	$(PYTHON) -m grpc_tools.protoc -Ipartition_server/api/protos --python_out=partition_server/api/protos \
	  --grpc_python_out=partition_server/api/protos partition_server/api/protos/*.proto
	sed -i -E 's/^import (\w+_pb2)/from . import \1/' partition_server/api/protos/*_pb2_grpc.py
	# tritonclient.grpc puts its own inference.* messages into protobuf's default pool; ours get a
	# private pool so both can be imported in one process (the wire format does not change).
	sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' \
	  partition_server/api/protos/grpc_predict_v2_pb2.py

clean:
	rm -rf $(VENV) .pytest_cache

include mk/cluster.mk
include mk/install.mk
include mk/node.mk

# The control plane's scripts run on the project's Python.
cluster cluster-down cluster-status: install
