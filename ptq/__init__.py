"""ptq: post-training quantization of Hugging Face causal language models."""

__version__ = "0.1.0"

from ptq.api import quantize  # noqa: E402
from ptq.quant import ActSpec, WeightSpec  # noqa: E402
from ptq.recipe import Recipe  # noqa: E402

__all__ = ["ActSpec", "Recipe", "WeightSpec", "quantize", "__version__"]
