"""Datasets: scikit-learn's digits, MNIST in IDX files (parsed here) and npz.
"""
