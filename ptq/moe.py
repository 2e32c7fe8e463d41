"""Mixture-of-experts blocks: each routed expert quantized as its own linears.

transformers stores a block's routed experts fused, as 3-D parameters (``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I] for Mixtral, Qwen2/3-MoE and DeepSeek; transposed, interleaved and with biases
for gpt-oss; ``models.Experts`` says which). Forward hooks cannot see one expert's inputs there, so while
a block is quantized ``unfuse`` puts an ``ExpertStack`` in its place: one ``Expert`` per expert with
ordinary ``gate_proj``, ``up_proj`` and ``down_proj`` linears (named ``<path>.<e>.gate_proj``, as the
experts of a Hub checkpoint are), computing what the fused module computes. Every method then treats
them as it treats any linear. ``fuse`` writes the quantized weights back into the model's own 3-D
parameters and puts the original module back, so the model runs (and is evaluated) as transformers
defines it; where activations are quantized, the quantizers sit on the experts' linears, so those blocks
keep their ``ExpertStack`` (which computes what the fused module computes).

Calibration (``MoEPolicy``): by default each expert's statistics come from the tokens the router sends
it. With ``calibrate_all_experts`` every token also goes through every expert, for the statistics only:
the block's output still follows the real routing (as llm-compressor's option does). An expert that saw
fewer than ``min_tokens`` tokens has too few for a Hessian: GPTQ rounds it to nearest instead (RTN of
its weights; GPTQ with H = I is the same thing) and the record names it. Routers are never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptq.errors import UserError
from ptq.models import Experts, get_submodule

FUSED_WEIGHTS = ("gate_up_proj", "down_proj")  # the fused experts' weight parameters (biases aside)


@dataclass
class MoEPolicy:
    """How experts are calibrated (``moe.*`` settings)."""

    calibrate_all_experts: bool = False  # every calibration token through every expert, for statistics only
    min_tokens: int = 16  # fewer tokens than this: the expert is rounded to nearest, and the record says so

    def __post_init__(self) -> None:
        if not isinstance(self.calibrate_all_experts, bool):
            raise UserError(f"moe.calibrate_all_experts={self.calibrate_all_experts!r} must be true or false")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            raise UserError(f"moe.min_tokens={self.min_tokens!r} must be a whole number of at least 1")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    if bias is not None:
        linear.bias.data.copy_(bias)
    return linear.requires_grad_(False)


class Expert(nn.Module):
    """One routed expert as three linears: down(act(gate(x)) * up(x)), or gpt-oss's clamped SwiGLU."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, activation) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation  # (gate, up) -> the input of down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x), self.up_proj(x)))


def _swiglu(act_fn):
    return lambda gate, up: act_fn(gate) * up


def _gpt_oss_glu(alpha: float, limit: float):
    def glu(gate, up):  # GptOssExperts._apply_gate, on de-interleaved gate and up
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return glu


class ExpertStack(nn.ModuleList):
    """The routed experts of one block, unfused (``unfuse``); called as the fused module is:
    ``(hidden [tokens, H], top_k_index [tokens, k], top_k_weights [tokens, k]) -> [tokens, H]``."""

    def __init__(self, fused: nn.Module, layout: str, calibrate_all: bool) -> None:
        if layout == "gate_up":  # gate_up_proj [E, 2I, H], down_proj [E, H, I]: nn.Linear's [out, in]
            gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
            half = gate_up.shape[1] // 2
            activation = _swiglu(fused.act_fn)
            experts = [
                Expert(_linear(gate_up[e, :half], None), _linear(gate_up[e, half:], None), _linear(down[e], None),
                       activation)
                for e in range(gate_up.shape[0])
            ]  # fmt: skip
        elif layout == "gpt_oss":  # gate_up_proj [E, H, 2I] (x @ W, gate and up interleaved), down_proj [E, I, H]
            gate_up, gate_up_bias = fused.gate_up_proj.data, fused.gate_up_proj_bias.data
            down, down_bias = fused.down_proj.data, fused.down_proj_bias.data
            activation = _gpt_oss_glu(fused.alpha, fused.limit)
            experts = [
                Expert(_linear(gate_up[e][:, ::2].t(), gate_up_bias[e][::2]),
                       _linear(gate_up[e][:, 1::2].t(), gate_up_bias[e][1::2]),
                       _linear(down[e].t(), down_bias[e]), activation)
                for e in range(gate_up.shape[0])
            ]  # fmt: skip
        else:
            raise ValueError(f"unknown expert layout {layout!r}")
        super().__init__(experts)
        self.layout = layout
        object.__setattr__(self, "fused", fused)  # not a child: its parameters are not the stack's
        self.calibrate_all = calibrate_all

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        # The (token, slot) pairs sorted by expert, and how many each expert got: one host sync per call,
        # not one per expert.
        k = top_k_index.shape[-1]
        order = torch.argsort(top_k_index.reshape(-1), stable=True)
        counts = torch.bincount(top_k_index.reshape(-1), minlength=len(self)).tolist()
        start = 0
        for expert, count in zip(self, counts[: len(self)], strict=True):
            pairs = order[start : start + count]
            start += count
            tokens, slot = pairs // k, pairs % k
            if self.calibrate_all:  # every token through the expert (its hooks see them all); the routed ones count
                y = expert(hidden)[tokens]
            elif count:
                y = expert(hidden[tokens])
            else:
                continue
            out.index_add_(0, tokens, (y * top_k_weights[tokens, slot, None]).to(out.dtype))
        return out

    def release_fused(self) -> None:
        """Let the fused module's full-precision weights go: this stack stays in the model for good."""
        object.__setattr__(self, "fused", None)

    @torch.no_grad()
    def write_back(self) -> None:
        """Write every expert's (quantized) weights into the fused parameters, in their layout."""
        fused = self.fused
        for e, expert in enumerate(self):
            gate, up, down = expert.gate_proj, expert.up_proj, expert.down_proj
            if self.layout == "gate_up":
                half = gate.weight.shape[0]
                fused.gate_up_proj.data[e, :half].copy_(gate.weight)
                fused.gate_up_proj.data[e, half:].copy_(up.weight)
                fused.down_proj.data[e].copy_(down.weight)
            else:
                fused.gate_up_proj.data[e][:, ::2].copy_(gate.weight.t())
                fused.gate_up_proj.data[e][:, 1::2].copy_(up.weight.t())
                fused.down_proj.data[e].copy_(down.weight.t())


def _parent(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (get_submodule(block, parent_path) if parent_path else block), name


def unfuse(block: nn.Module, experts: Experts | None, policy: MoEPolicy) -> ExpertStack | None:
    """Put an ``ExpertStack`` in place of the block's fused experts (None for a dense block)."""
    if experts is None:
        return None
    fused = get_submodule(block, experts.path)
    if fused is None:  # a dense layer of a MoE model (DeepSeek's first layers, Qwen2-MoE's mlp_only_layers)
        return None
    stack = ExpertStack(fused, experts.layout, policy.calibrate_all_experts)
    parent, name = _parent(block, experts.path)
    setattr(parent, name, stack)
    return stack


def fuse(block: nn.Module, experts: Experts, stack: ExpertStack) -> None:
    """Write the experts' weights back and restore the model's own module."""
    stack.write_back()
    parent, name = _parent(block, experts.path)
    setattr(parent, name, stack.fused)


def expert_stages(experts: Experts, block: nn.Module, count: int) -> tuple[tuple[tuple[str, ...], ...], ...]:
    """The two stages of a MoE block's linears: every expert's (gate, up) with the shared expert's, then
    every down projection. The groups of a stage are collected in one forward pass."""
    members = experts.members(block, count)
    return (
        tuple((f"{m}.gate_proj", f"{m}.up_proj") for m in members),
        tuple((f"{m}.down_proj",) for m in members),
    )


def summary(stack: ExpertStack, experts: Experts, stats: dict) -> dict:
    """What the record keeps of one MoE block: the tokens each expert's statistics saw (null when the
    method reads none) and the experts quantized by the fallback."""
    tokens = []
    for e in range(len(stack)):  # the tokens of its first linear with a count (AWQ counts at down_proj)
        counts = [stats.get(f"{experts.path}.{e}.{proj}", {}).get("tokens") for proj in ("gate_proj", "up_proj",
                                                                                       "down_proj")]  # fmt: skip
        tokens.append(next((n for n in counts if n is not None), None))
    routed = [name for name in stats if name.startswith(experts.path + ".")]
    fallback = sorted({name.rsplit(".", 1)[0] for name in routed if stats[name].get("fallback")})
    return {"experts": len(stack), "calibrate_all_experts": stack.calibrate_all, "tokens": tokens,
            "fallback": fallback}  # fmt: skip


def moe_blocks(model: nn.Module) -> tuple[Experts | None, list[tuple[str, nn.Module]]]:
    """The model's experts entry and its MoE blocks as (prefix, block); (None, []) for a dense model, or
    any module that is not a language model of the architecture table."""
    from ptq.models import ARCHITECTURES, get_blocks

    arch = ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None))
    if arch is None or arch.experts is None:
        return None, []
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [(names[id(b)], b) for b in get_blocks(model) if get_submodule(b, arch.experts.path) is not None]
    return arch.experts, blocks


def fused_parameter_names(model: nn.Module) -> set[str]:
    """The names of a MoE model's fused expert weights (what its experts' linears are stored as)."""
    experts, blocks = moe_blocks(model)
    return {f"{prefix}.{experts.path}.{param}" for prefix, _ in blocks for param in FUSED_WEIGHTS}
