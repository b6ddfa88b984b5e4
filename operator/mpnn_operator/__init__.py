"""The control plane: a kopf operator that turns NeuralNetwork resources into partition servers.

It imports only the data plane's contracts (:mod:`partition_server.api`); the ``mpnn`` CLI
loads it by name for ``mpnn operator``, which needs the ``[operator]`` extra (kopf,
kubernetes), and for ``mpnn render``, which does not (builders and naming are plain Python).
See ``docs/operator.md``.
"""

__all__: list[str] = []
