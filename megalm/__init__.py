"""megalm: a Megatron-style trainer for GPT/Llama-class models on PyTorch."""
__version__ = "0.1.0"
