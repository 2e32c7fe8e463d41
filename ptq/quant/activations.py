"""Activation quantization: fake-quantize every quantized linear's input (``ActSpec``).

- ``per_token`` (dynamic): each token's vector gets its own scale max|x| / qmax at run time.
- ``per_tensor`` (static): one scale per linear, max|x| / qmax over the calibration tokens, fixed
  afterwards; values beyond the calibrated range saturate.
- ``per_block``: NVFP4 / MX blocks along the features, scaled as their weights are, each block's
  scale from the input at run time; NVFP4's global scale 448 * 6 / max|x| is calibrated like a
  per-tensor scale (one fixed value per linear, as engines run NVFP4 and checkpoints store it).

Integer activations are symmetric and signed, qmax = 2^(bits-1) - 1 (127 for int8), as in
SmoothQuant's ``quantize_activation_per_*_absmax``; FP8 ones use the format's largest value.
The rounding is done in fp32 and the result returned in the input's dtype.

The quantizer is a forward pre-hook remembered on the module (``_ptq_input_quantizer``), so that
code replacing a linear (packing it into a ``QuantLinear``) can carry it over: ``move_input_quantizer``.
"""

from __future__ import annotations

import torch
from torch import nn

from ptq.quant.spec import ActSpec


class InputQuantizer:
    """A forward pre-hook that fake-quantizes a linear's input; ``scale`` is the calibrated one (the
    per-tensor scale, or NVFP4's global scale) where the spec has one."""

    def __init__(self, spec: ActSpec, scale: torch.Tensor | None = None) -> None:
        if spec.calibrated != (scale is not None):
            need = "needs its calibrated scale" if spec.calibrated else "takes no calibrated scale"
            raise ValueError(f"a {spec.describe()} activation quantizer {need}")
        self.spec = spec
        self.scale = scale

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self.spec.static:
            q = self.spec.quantize_static(x, self.scale.to(x.device))
        else:
            scale = None if self.scale is None else self.scale.to(x.device)
            q = self.spec.quantize_dynamic(x, scale)
        return (q.to(x.dtype), *args[1:])


def attach_input_quantizer(linear: nn.Module, quantizer: InputQuantizer) -> None:
    """Install ``quantizer`` on ``linear`` (replacing any earlier one); it stays for every later forward."""
    old = getattr(linear, "_ptq_input_quantizer", None)
    if old is not None:
        old[1].remove()
    handle = linear.register_forward_pre_hook(quantizer)
    linear._ptq_input_quantizer = (quantizer, handle)


def input_quantizer_of(linear: nn.Module) -> InputQuantizer | None:
    entry = getattr(linear, "_ptq_input_quantizer", None)
    return entry[0] if entry else None


def move_input_quantizer(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (a module replacing ``old``) the input quantizer ``old`` had, if any."""
    quantizer = input_quantizer_of(old)
    if quantizer is not None:
        attach_input_quantizer(new, quantizer)
