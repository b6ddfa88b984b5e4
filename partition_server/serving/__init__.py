"""The partition server: the peer service ``mpnn.v1.Partition`` and the Open Inference Protocol v2
over gRPC and REST.

Modules, from the process down:

- ``main``: ``mpnn serve``, one partition server as a process (signals, parent death, hostname ordinal).
- ``server``: ``PartitionServer``, the ``mpnn.v1.Partition`` servicer and its lifecycle.
- ``loading``: the lookup table and this partition's rows from checkpoint, import or seeded init.
- ``peers``: channels to the peers and the engine's transport over ``Exchange``.
- ``limits``: how the gRPC thread pool is divided between passes and everything else.
- ``reasons``: machine-readable failure reasons sent as trailing metadata (``mpnn-error``).
- ``protocol``: the Open Inference Protocol model: metadata, errors, the input codec.
- ``inference``: ``ModelInference``, readiness and the coordinated forward pass.
- ``drivers`` and ``retry``: the drivers and pass slots an entry point keeps, and when a pass is retried.
- ``inference_grpc``: ``inference.GRPCInferenceService``.
- ``rest`` and ``rest_codec``: the REST binding on ``aiohttp.web``, and its bodies.
"""

__all__: list[str] = []
