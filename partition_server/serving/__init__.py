"""The partition server: the peer service ``mpnn.v1.Partition`` and the Open Inference Protocol v2
over gRPC and REST.
"""
