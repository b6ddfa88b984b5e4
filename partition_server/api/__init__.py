"""The contracts both planes share: the NeuralNetwork API type, the distributor, the lookup table,
field errors, the tensor wire format and the gRPC protocol definitions.

Nothing here serves or computes: the operator imports only this layer.
"""
