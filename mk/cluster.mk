# Local Kubernetes control plane (see docs/local-control-plane.md).
# Included by the top-level Makefile.
#
#   make k8s-binaries   build/reuse pinned etcd, kube-apiserver,
#                       kube-controller-manager, kube-scheduler, kubectl, kwok
#   make cluster        start a control plane with 2 kwok nodes; admin
#                       kubeconfig in $(CLUSTER_DIR)/kubeconfig
#   make cluster NODE=real   the same with a real node instead (mk/node.mk)
#   make cluster-down   stop it (by pid), undo a real node's host changes, remove $(CLUSTER_DIR)

K8S_CACHE ?= .cache/k8s
K8S_BIN := $(K8S_CACHE)/current
CLUSTER_DIR ?= .cache/cluster
CLUSTER_NODES ?= 2
PYTHON ?= .venv/bin/python

.PHONY: k8s-binaries cluster cluster-down cluster-status

k8s-binaries:
	K8S_CACHE='$(K8S_CACHE)' nice -n 10 bash hack/k8s/build.sh >/dev/null

ifeq ($(NODE),real)
cluster: k8s-binaries node-packages node-images
	$(PYTHON) -m tests.support.kube.cluster up --state-dir '$(CLUSTER_DIR)' --bin-dir '$(K8S_BIN)' --nodes 0 \
	  --real-node $$(IMAGE_CACHE='$(IMAGE_CACHE)' bash hack/image/build.sh --print-path | sed 's/^/--image /') \
	  --image $$(IMAGE_CACHE='$(IMAGE_CACHE)' bash hack/image/pause.sh '$(K8S_BIN)/pause')
else
cluster: k8s-binaries
	$(PYTHON) -m tests.support.kube.cluster up --state-dir '$(CLUSTER_DIR)' --bin-dir '$(K8S_BIN)' --nodes $(CLUSTER_NODES)
endif

cluster-down:
	$(PYTHON) -m tests.support.kube.cluster down --state-dir '$(CLUSTER_DIR)'

cluster-status:
	$(PYTHON) -m tests.support.kube.cluster status --state-dir '$(CLUSTER_DIR)'
