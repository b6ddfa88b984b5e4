# mpnn — see README.md. `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench bench-deps protos clean

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

# The contenders of bench/contenders.py: Open MPI from Debian and mpi4py in the venv. Where they
# cannot be installed (no apt-get, no root, no network), the mpi4py contender is skipped with a
# message and the rest of the bench runs.
bench-deps: install
	@command -v mpirun >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev) \
	  || echo "bench: could not install openmpi-bin/libopenmpi-dev; the mpi4py contender will be skipped"; }
	@$(PYTHON) -c 'import mpi4py' 2>/dev/null || { command -v mpicc >/dev/null 2>&1 && $(PIP) install --quiet mpi4py \
	  || echo "bench: could not install mpi4py; the mpi4py contender will be skipped"; }

bench: bench-deps
	$(PYTHON) bench/contenders.py --memory

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
