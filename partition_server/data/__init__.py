"""Datasets: scikit-learn's digits, MNIST in IDX files (parsed here) and npz.

Modules: :mod:`.datasets` (the loaders and ``load_dataset``, the public face),
:mod:`.base` (``Dataset``, ``DatasetError``), :mod:`.idx` (the IDX parser) and
:mod:`.mnist` (the MNIST loader and downloader).
"""

__all__: list[str] = []
