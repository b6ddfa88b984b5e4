"""mpnn's data plane: partition servers, their clients and the contracts both planes share.

Subpackages, from the bottom layer up: ``api`` (contracts), ``engine`` (the math), ``storage``
and ``data``, ``serving`` (the partition server) and ``client`` (driver, trainer, local mode).
"""
