"""Helpers shared by the tests: local data-plane clusters and the Kubernetes control plane."""
