"""QuaRot (Ashkboos et al., 2024): rotate the model so that its activations have no outlier channels,
without changing what it computes, then quantize (4-bit activations become usable).

With Q an orthogonal n x n matrix (n = hidden size; a random Hadamard, ``ptq.quant.hadamard``):

1. RMSNorm scales are fused into the linears that read the norm (W <- W diag(g), g <- 1): an RMSNorm
   without scale commutes with Q, since ||x Q|| = ||x||.
2. The residual stream is rotated, x -> x Q: the embedding rows and every linear writing the stream (o,
   down) on their output side (W <- Q^T W, b <- b Q), every linear reading it (q, k, v, gate, up, the LM
   head) on their input side (W <- W Q). The model computes the same function (Sec. 4.1, Fig. 3).
3. Between v and o, a Hadamard per head of size head_dim (W_v <- H^T W_v per head, W_o <- W_o H per
   head): attention mixes tokens, not features, so it passes through (Sec. 4.2).
4. The input of down_proj is rotated online by a Hadamard H_d of the MLP's width (a forward pre-hook,
   kept through module replacement), W_down <- W_down H_d (Sec. 4.2, "FFN").

Steps 1-3 run in fp32 and change only weights; step 4 adds one fast transform per MLP. The embedding
and head are rotated once, before the block loop (``transform_model``); each block when the pipeline
reaches it (``quantize_block``), so offloaded and lazily loaded models are rotated one block at a time.
As the last step of a method (``method=quarot``) it also rounds the weights (RTN); with ``bits=16`` it
only rotates.
"""

from __future__ import annotations

import torch
from torch import nn

from ptq.errors import UserError
from ptq.methods.base import Method
from ptq.methods.rtn import round_linears
from ptq.models import ResidualStream, arch_for, get_submodule, get_weight, head_dim_of, set_weight
from ptq.pipeline import BlockContext
from ptq.quant import WeightSpec
from ptq.quant.activations import attach_input_rotation
from ptq.quant.hadamard import Rotation


class RotationError(UserError):
    """The model cannot be rotated; the message names what can."""


def _rotate_input_side(linear: nn.Module, rotation: Rotation, scale: torch.Tensor | None = None) -> None:
    """W <- (W diag(scale)) Q: the linear now reads x Q (and x's norm no longer scales it)."""
    weight = get_weight(linear)
    w = weight.float() if scale is None else weight.float() * scale.float()[None, :]
    set_weight(linear, rotation.apply(w).to(weight.dtype))


def _rotate_output_side(linear: nn.Module, rotation: Rotation) -> None:
    """W <- Q^T W, b <- b Q: the linear now writes y Q."""
    weight = get_weight(linear)
    set_weight(linear, rotation.apply(weight.float().t()).t().to(weight.dtype))
    if getattr(linear, "bias", None) is not None:
        linear.bias.data = rotation.apply(linear.bias.data.float()).to(linear.bias.dtype)


def _per_head(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rotate each head_dim-wide slice of the last dimension."""
    d = rotation.n
    return rotation.apply(x.reshape(*x.shape[:-1], -1, d)).reshape(x.shape)


class QuaRot(Method):
    name = "quarot"
    transform = True
    rotates_without_weights = True  # method=quarot bits=16: the rotated, unquantized model
    installs_input_stages = True  # the online Hadamard on down_proj's input

    def __init__(self, spec: WeightSpec | None, seed: int = 0) -> None:
        super().__init__(spec)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"method.quarot.seed={seed!r} must be a whole number (it picks the random Hadamard)")
        self.seed = seed
        self.stream: ResidualStream | None = None

    def prepare(self, config) -> None:
        arch = arch_for(config.model_type)
        if arch.residual is None:
            raise RotationError(
                f"method=quarot: architecture {config.model_type!r} has no residual-stream entry in ptq's "
                "architecture table (ptq/models.py, ResidualStream); rotations support the Llama family (llama, "
                "mistral, qwen2, qwen3)"
            )
        self.stream = arch.residual
        self.residual = Rotation.build(config.hidden_size, seed=self.seed)  # random Hadamard (Sec. 4.1)
        self.heads = Rotation.build(head_dim_of(config))
        self.mlp = Rotation.build(config.intermediate_size)

    @torch.no_grad()
    def transform_model(self, model: nn.Module) -> dict:
        """Rotate the embedding and the head (fusing the final norm into it); unties them if tied."""
        stream = self.stream
        embedding = get_submodule(model, stream.embedding)
        head = get_submodule(model, stream.head)
        norm = get_submodule(model, stream.final_norm)
        if head.weight is embedding.weight:  # after the rotation they differ (the head holds the norm's scale)
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
            text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
            if text_config is not None:
                text_config.tie_word_embeddings = False
        w = embedding.weight
        embedding.weight.data = self.residual.apply(w.data.float()).to(w.dtype)
        _rotate_input_side(head, self.residual, norm.weight)
        norm.weight.data.fill_(1.0)
        return {"seed": self.seed, "residual": self.residual.to_dict(), "per_head": self.heads.to_dict(),
                "online_mlp": self.mlp.to_dict()}  # fmt: skip

    @torch.no_grad()
    def quantize_block(self, ctx: BlockContext) -> None:
        stream, block = self.stream, ctx.block
        for norm_name, readers in stream.readers:
            norm = get_submodule(block, norm_name)
            for name in readers:
                _rotate_input_side(get_submodule(block, name), self.residual, norm.weight)
            norm.weight.data.fill_(1.0)
        for name in stream.writers:
            _rotate_output_side(get_submodule(block, name), self.residual)
        value, out = get_submodule(block, stream.value), get_submodule(block, stream.attention_out)
        v = get_weight(value)  # [kv_heads * head_dim, in]: rotate each head's output rows
        set_weight(value, _per_head(v.float().t(), self.heads).t().to(v.dtype))
        if value.bias is not None:
            value.bias.data = _per_head(value.bias.data.float(), self.heads).to(value.bias.dtype)
        o = get_weight(out)  # [out, heads * head_dim]: rotate each head's input columns
        set_weight(out, _per_head(o.float(), self.heads).to(o.dtype))
        down = get_submodule(block, stream.mlp_out)
        _rotate_input_side(down, self.mlp)
        attach_input_rotation(down, self.mlp)
        if self.round_weights and self.spec is not None:
            round_linears(ctx, self.spec)

    def restore_block(self, ctx: BlockContext) -> None:
        attach_input_rotation(get_submodule(ctx.block, self.stream.mlp_out), self.mlp)
