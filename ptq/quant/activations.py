"""Activation quantization (fake-quant of every quantized linear's input), symmetric integers.

- ``per_token`` (dynamic): each token's vector gets its own scale max|x| / qmax at run time.
- ``per_tensor`` (static): one scale per linear, max|x| / qmax over the calibration tokens, fixed
  afterwards; values beyond the calibrated range are clipped.

qmax = 2^(bits-1) - 1 (127 for int8), as in SmoothQuant's ``quantize_activation_per_*_absmax``.
The rounding is done in fp32 and the result returned in the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GRANULARITIES = ("per_token", "per_tensor")


@dataclass(frozen=True)
class ActSpec:
    bits: int = 8
    granularity: str = "per_token"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 4 <= self.bits <= 8:
            raise ValueError(
                f"act_bits={self.bits!r} is outside 4..8 (symmetric integer activations); omit it for none"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"act_granularity={self.granularity!r} is unknown; choose one of {', '.join(GRANULARITIES)}"
            )

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def static(self) -> bool:
        return self.granularity == "per_tensor"


def check_weight_format(weights, act: ActSpec) -> None:
    """An integer matmul can apply one weight scale per output row only, with no zero point to
    correct for: activation quantization needs per-channel symmetric weights (``QuantSpec``)."""
    if weights.group_size != -1 or not weights.sym:
        raise ValueError(
            f"act_bits={act.bits} needs weights with one symmetric scale per output channel (what integer "
            f"matmul kernels use), not group_size={weights.group_size} sym={weights.sym}: set group_size=-1 sym=true"
        )


def quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / qmax
    return (torch.round(xf / scale) * scale).to(x.dtype)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    return (torch.clamp(torch.round(x.float() / scale), -qmax, qmax) * scale).to(x.dtype)


class InputQuantizer:
    """A forward pre-hook that fake-quantizes a linear's input; ``scale`` is set for static ones."""

    def __init__(self, spec: ActSpec, scale: torch.Tensor | None = None) -> None:
        if spec.static and scale is None:
            raise ValueError("a per_tensor activation quantizer needs its calibrated scale")
        self.spec = spec
        self.scale = scale

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self.spec.static:
            q = quantize_per_tensor(x, self.scale.to(x.device), self.spec.bits)
        else:
            q = quantize_per_token(x, self.spec.bits)
        return (q, *args[1:])


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
