//go:build tools

// Package tools pins the kubernetes node commands built by hack/k8s/build.sh --node.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
