"""The execution engine: one partition's share of the forward and backward passes, the optimizers,
the activations, and the mailbox that collects what peers send. It imports no gRPC: the
transport is given to it.

Modules, from the bottom up:

- ``activations``: each activation next to its derivative, one table entry per API name.
- ``optimizers``: ``OptimizerConfig``, SGD with momentum and Adam.
- ``batch``: ``validate_batch``, the check every pass makes before any traffic.
- ``init``: ``init_rows``/``init_partition``/``init_params``, the deterministic initial weights
  (a pure function of seed, layer and row).
- ``plan``: the communication plan, who sends what to whom per layer.
- ``versions``: the parameters by optimizer step (``WeightsChanged``).
- ``transport`` and ``mailbox``: how messages reach the engine.
- ``passes``: ``PartitionEngine``, the forward and backward passes.

Other packages import from here, not from the modules.
"""

from partition_server.engine.activations import TABLE as ACTIVATION_TABLE
from partition_server.engine.activations import Activation, activate, activation_derivative
from partition_server.engine.batch import validate_batch
from partition_server.engine.init import init_params, init_partition, init_rows
from partition_server.engine.mailbox import Mailbox, MailboxFull, PeerLost, StepAborted
from partition_server.engine.optimizers import OptimizerConfig
from partition_server.engine.passes import PartitionEngine, StepResult
from partition_server.engine.plan import LOG_FROM, is_phase
from partition_server.engine.transport import ExchangeError, Transport
from partition_server.engine.versions import WEIGHTS_CHANGED, WeightsChanged

__all__ = [
    "ACTIVATION_TABLE",
    "Activation",
    "ExchangeError",
    "LOG_FROM",
    "Mailbox",
    "MailboxFull",
    "OptimizerConfig",
    "PartitionEngine",
    "PeerLost",
    "StepAborted",
    "StepResult",
    "Transport",
    "WEIGHTS_CHANGED",
    "WeightsChanged",
    "activate",
    "activation_derivative",
    "init_params",
    "init_partition",
    "init_rows",
    "is_phase",
    "validate_batch",
]
