"""Clients of deployed partition servers: the driver (training steps, checkpoints, evaluation),
the training run of ``mpnn train`` and local mode (``mpnn run``).
"""
