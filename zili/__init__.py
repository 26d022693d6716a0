"""zili (自立): train large language models on any accelerator with PyTorch's own distributed engine."""

__version__ = "0.1.0"
