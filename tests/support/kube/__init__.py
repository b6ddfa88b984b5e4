"""Local Kubernetes control plane (etcd, kube-apiserver, controller manager,
scheduler, kwok) for tests and manual trials; see tests/support/kube/cluster.py."""
