"""The execution engine: one partition's share of the forward and backward passes, the optimizers,
the activations, and the mailbox that collects what peers send. It imports no gRPC: the
transport is given to it.
"""
