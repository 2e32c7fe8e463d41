"""ptq: post-training quantization of Hugging Face causal language models."""

__version__ = "0.1.0"

from ptq.api import quantize  # noqa: E402

__all__ = ["quantize", "__version__"]
