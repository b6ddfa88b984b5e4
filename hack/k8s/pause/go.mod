module mpnn.local/hack/k8s/pause

go 1.24.0
