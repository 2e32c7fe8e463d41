"""Linears that read the same input computed as one product, for inference: q, k, v and gate, up.

Serving engines multiply a block's attention input by q, k and v at once and its MLP input by gate and up at
once; at one token each product is short, and launching three or two of them costs more than reading the
weights (``ptq.bench.kernels``: k and v of the Llama-3-8B shape in 4 bits are launch-bound). ``fuse_projections``
does the same to a model whose blocks the architecture table describes (``Arch.residual.readers``: the
linears that read each norm's output): each group's layers are joined along the output dimension with their
stored numbers unchanged (``ptq.quant.linear.join_outputs``), and each former layer becomes a part that returns
its slice of the joined product. The first part's call computes the product; the others return their slices
while the input is the same tensor (any other input is computed anew, so the result never depends on the
order of the calls). The product is released once every part has taken its slice.

``sort_act_order_groups`` stores act-order layers' inputs in group order (Marlin's reordering), so that they
compute through the contiguous-group kernels; joined act-order layers share one order and one gather.

A SwiGLU MLP (``Arch.gated_mlp`` with SiLU) of W8A8 layers becomes one ``SwiGLU`` module, whose one-token product
takes three launches: the joined gate/up product writes h = SiLU(gate) * up, one kernel rounds h per token (its
programs spread over the row), and down multiplies the codes. The layers alone take five at one token under
torch.compile (gate/up; SiLU * up, the maximum's two reductions and the rounding in three fused kernels; down).

The attention's output projection, where it is an FP8 W8A8 layer, rounds its input inside its product under
torch.compile (``rounds_own_input``): the attention kernel writes that input, so inductor has no kernel to fuse the
rounding into and would launch one for it alone. Int8 layers keep that kernel: their fastest one-token tile (DP4A)
reads the codes from memory as words of four, and the int8 tiles that round inside were slower than both launches.

For inference only: the joined layers replace the parts' weights, so a fused model is measured and run, not
saved as a checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptq.models import get_arch, get_blocks, get_submodule
from ptq.quant import kernels
from ptq.quant.linear import W8A8_LAYERS, Fp8Linear, Int8Linear, QuantLinear, fp8_rows, int8_rows, join_outputs


class SharedInput(nn.Module):
    """The joined layer of linears that read one input, and the product of its last input until each part
    has taken its slice."""

    def __init__(self, joined: nn.Module, sizes: list[int]):
        super().__init__()
        self.joined, self.sizes = joined, sizes
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] | None = None
        self._waiting = 0

    def slice_of(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._outputs is None or x is not self._input:
            self._outputs = self.joined(x).split(self.sizes, dim=-1)
            self._input, self._waiting = x, len(self.sizes)
        out = self._outputs[index]
        self._waiting -= 1
        if self._waiting == 0:
            self._input = self._outputs = None
        return out


class SharedInputPart(nn.Module):
    """What was one of the linears: its slice of the shared product."""

    def __init__(self, shared: SharedInput, index: int):
        super().__init__()
        self.shared, self.index = shared, index
        self.in_features, self.out_features = shared.joined.in_features, shared.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.slice_of(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of {len(self.shared.sizes)}, out={self.out_features}"


class SwiGLU(nn.Module):
    """down(SiLU(gate(x)) * up(x)) with gate and up joined into one W8A8 layer (gate's outputs, then up's) and down
    a W8A8 layer of the same kind: at one token on the kernels the three launches of the module docstring, otherwise
    the layers' own products."""

    def __init__(self, gate_up: Int8Linear | Fp8Linear, down: Int8Linear | Fp8Linear):
        super().__init__()
        self.gate_up, self.down_proj = gate_up, down
        self.act = kernels.ACT_FP8 if isinstance(down, Fp8Linear) else kernels.ACT_INT8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != 1 or not kernels.available(x, fp8=self.act == kernels.ACT_FP8):
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        if torch.compiler.is_compiling():  # torch ops, which inductor fuses into the norm that wrote x
            qx, x_scale = (fp8_rows if self.act == kernels.ACT_FP8 else int8_rows)(flat)
        else:
            qx, x_scale = kernels.quantize_rows(flat, self.act)
        first, down = self.gate_up, self.down_proj
        h = kernels.swiglu_matmul(qx, x_scale, first.weight, first.weight_scale, first.out_features, first.in_features,
                                  self.act, x.dtype)  # fmt: skip
        qh, h_scale = kernels.quantize_rows(h, self.act)
        y = kernels.codes_matmul(qh, h_scale, down.weight, down.weight_scale, down.out_features, down.in_features,
                                 self.act, x.dtype)  # fmt: skip
        return y.reshape(*x.shape[:-1], -1)


def swiglu_applies(model: nn.Module, gate_up: nn.Module, down: nn.Module) -> bool:
    """Whether a joined gate/up layer and down can run as ``SwiGLU``: SiLU as the MLP's activation, W8A8 layers of
    one kind without biases."""
    if getattr(model.config, "hidden_act", None) not in ("silu", "swish"):
        return False
    kind = type(down)
    return kind in W8A8_LAYERS and type(gate_up) is kind and gate_up.bias is None and down.bias is None


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Join each block's linears that read the same input and mark FP8 attention outputs to round their own input
    (see the module docstring); returns how many groups were joined. Groups whose layers do not join
    (``join_outputs`` gives None) stay as they are."""
    arch = get_arch(model)
    if arch.residual is None:
        return 0
    fused = 0
    for block in get_blocks(model):
        attention_out = get_submodule(block, arch.residual.attention_out)
        if isinstance(attention_out, Fp8Linear):
            attention_out.rounds_own_input = True
        for _, names in arch.residual.readers:
            layers = [get_submodule(block, name) for name in names]
            if any(layer is None for layer in layers):
                continue
            joined = join_outputs(layers)
            if joined is None:
                continue
            fused += 1
            mlp = arch.gated_mlp
            down = get_submodule(block, mlp.down) if mlp and tuple(names) == (mlp.gate, mlp.up) else None
            if down is not None and swiglu_applies(model, joined, down):
                block.set_submodule(mlp.module, SwiGLU(joined, down))
                continue
            shared = SharedInput(joined, [layer.out_features for layer in layers])
            for index, name in enumerate(names):
                block.set_submodule(name, SharedInputPart(shared, index))
    return fused


def sort_act_order_groups(model: nn.Module) -> int:
    """Store every act-order 4-bit layer's input features in group order (``QuantLinear.sort_groups``), so
    that it computes through the contiguous-group kernels and gathers its input instead; returns how many
    layers were sorted. Inference only, like joining: the layers no longer hold the checkpoint's layout."""
    return sum(module.sort_groups() for module in model.modules() if isinstance(module, QuantLinear))
