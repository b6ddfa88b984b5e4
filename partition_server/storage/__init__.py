"""The shared model on the volume: checkpoints of per-partition safetensors shards with a commit
record written last, and PyTorch ``nn.Linear`` import.
"""
