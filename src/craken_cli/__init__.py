"""craken: train language models with DeepSpeed ZeRO through Accelerate, from one validated spec."""

__version__ = "0.1.0"
