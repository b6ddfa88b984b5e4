# The mpnn image and the local real node (see docs/local-control-plane.md, "A real node").
# Included by the top-level Makefile.
#
#   make image            build/reuse the mpnn image: an OCI archive under $(IMAGE_CACHE), keyed by
#                         a content hash of its inputs (hack/image/build.sh; needs root, debootstrap)
#   make node-packages    apt-get install containerd, runc, the CNI plugins, iptables, conntrack and
#                         debootstrap (for the image's base)
#                         (only those missing)
#   make node-binaries    build/reuse kubelet, kube-proxy, CoreDNS and pause (hack/k8s/build.sh --node)
#   make cluster NODE=real   the control plane plus a real node running the mpnn image

IMAGE_CACHE ?= $(HOME)/.cache/mpnn/image
NODE ?= kwok
NODE_PACKAGES := containerd runc containernetworking-plugins iptables conntrack debootstrap

.PHONY: image node-packages node-binaries node-images e2e-prereqs

image:
	@IMAGE_CACHE='$(IMAGE_CACHE)' nice -n 19 bash hack/image/build.sh

node-packages:
	@missing=$$(for p in $(NODE_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	  | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; }; \
	fi

node-binaries:
	K8S_CACHE='$(K8S_CACHE)' nice -n 19 bash hack/k8s/build.sh --node >/dev/null

# Both image archives, one path a line.
node-images: image node-binaries
	@IMAGE_CACHE='$(IMAGE_CACHE)' bash hack/image/build.sh --print-path
	@IMAGE_CACHE='$(IMAGE_CACHE)' bash hack/image/pause.sh '$(K8S_BIN)/pause'

# What tests/e2e needs, built before pytest (outside its timeouts) where a real node can run:
# as root; elsewhere the e2e tests skip with the reason (fail with CI=true).
e2e-prereqs:
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory node-packages node-images >/dev/null; \
	else echo "e2e-prereqs: not root, the real-node tests will skip"; fi
