"""Local Kubernetes control plane (etcd, kube-apiserver, controller manager,
scheduler, kwok) for tests and manual trials; see tests/kube/cluster.py."""
