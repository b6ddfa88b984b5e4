"""The shared model on the volume: checkpoints of per-partition safetensors shards, written only
for a sequence the driver reserved, with a commit record (``commit.json``) written last and
checked (sha256 of every shard) at commit and load, PyTorch ``nn.Linear`` import and export,
and the one atomic-write helper every writer of shared files uses.

Modules: :mod:`.store` (``ModelStore``, the public face), :mod:`.atomic` (atomic, durable
writes), :mod:`.validation` (errors and input checks), :mod:`.schema` (layout, shard
descriptions, commit record), :mod:`.reservation` (reserving a sequence and checking a
reservation), :mod:`.checkpoint` (reader and coverage index), :mod:`.writer`,
:mod:`.files` (safetensors save and hashing) and :mod:`.pytorch`.
"""

__all__: list[str] = []
