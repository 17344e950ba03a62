"""Files: the Hugging Face sharded safetensors layout and the Megatron shard directory.

Modules that move tensors import torch; importing this package does not.
"""
