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

The quantizer is a stage of the module's one ptq pre-hook (``InputStages``), after an online rotation
where QuaRot installs one; code replacing a linear carries both over: ``move_input_stages``.
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.static:
            q = self.spec.quantize_static(x, self.scale.to(x.device))
        else:
            scale = None if self.scale is None else self.scale.to(x.device)
            q = self.spec.quantize_dynamic(x, scale)
        return q.to(x.dtype)


# What a linear's input goes through, in this order: an online rotation (QuaRot's Hadamard on the input
# of down_proj, ``ptq.quant.hadamard.Rotation``), then fake quantization (``InputQuantizer``).
STAGES = ("rotation", "quantizer")


class InputStages:
    """The one forward pre-hook ptq installs on a linear, running its input stages in ``STAGES`` order.
    It is remembered on the module (``_ptq_input_stages``) so that code replacing the module (packing it
    into a ``QuantLinear``) carries every stage over at once, in order: ``move_input_stages``."""

    def __init__(self) -> None:
        self.stages: dict[str, object] = {}

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        for name in STAGES:
            if name in self.stages:
                stage = self.stages[name]
                x = stage.apply(x) if name == "rotation" else stage(x)
        return (x, *args[1:])


def _stages(linear: nn.Module) -> InputStages:
    entry = getattr(linear, "_ptq_input_stages", None)
    if entry is None:
        entry = InputStages()
        linear.register_forward_pre_hook(entry)
        linear._ptq_input_stages = entry
    return entry


def attach_input_quantizer(linear: nn.Module, quantizer: InputQuantizer) -> None:
    """Install ``quantizer`` on ``linear`` (replacing any earlier one); it stays for every later forward."""
    _stages(linear).stages["quantizer"] = quantizer


def attach_input_rotation(linear: nn.Module, rotation) -> None:
    """Rotate ``linear``'s input online (x -> x @ Q, before any quantizer); its weight must be W @ Q."""
    _stages(linear).stages["rotation"] = rotation


def input_quantizer_of(linear: nn.Module) -> InputQuantizer | None:
    entry = getattr(linear, "_ptq_input_stages", None)
    return entry.stages.get("quantizer") if entry else None


def input_rotation_of(linear: nn.Module):
    entry = getattr(linear, "_ptq_input_stages", None)
    return entry.stages.get("rotation") if entry else None


def move_input_stages(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (a module replacing ``old``) the input stages ``old`` had, if any."""
    entry = getattr(old, "_ptq_input_stages", None)
    if entry is not None:
        _stages(new).stages.update(entry.stages)
