"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"), following mit-han-lab/llm-awq's ``auto_scale`` and ``auto_clip``.

Per scaling group of a block (a previous op, the linears it feeds, and the module whose output is
compared; see ``ScaleGroup`` in ptq/models.py):

1. Scale search (Sec. 3.2, Eq. 5): with a = mean |x| per input channel over the calibration tokens,
   try s = a^alpha for alpha in {0, 1/n, ..., (n-1)/n} (``duo_scaling``: s = a^alpha / w^(1-alpha),
   w the mean of group-normalized |W| per channel), normalized by sqrt(max(s) min(s)). For each, the
   group's weights become Q(W diag(s)) diag(s)^-1 and the compared module is run on the block's
   calibration inputs; the alpha with the lowest output MSE against full precision wins. The scales
   are then folded into the previous op and the linears (function-preserving, ptq/methods/scaling.py).
2. Clipping search (``clip``): per quantization group, shrink the weight range to max|w| * (1 - i/n)
   for i < ``clip_max_shrink`` * n and keep the value with the lowest output error on a sample of
   ``clip_tokens`` input tokens. q/k projections are not clipped (the reference skips them).
3. Round to nearest, unless a later step (``awq+gptq``) quantizes the weights.

When the compared module is one linear, the output MSE is computed from E = W_q - W and the input's
Gram matrix, tr(E X^T X E^T) / (tokens * rows): the same number, without running the module.

Both searches read the first calibration chunks up to ``search_tokens`` tokens (default 65,536: the
reference's whole calibration budget, 128 x 512); the clip sample is every k-th of those tokens.
Calibration windows are drawn at random, so these are a random subset; with 128 x 2048 calibration
tokens this does a quarter of the work.

Each group's inputs are re-captured after the earlier groups' scales were folded in, so they are
already in the scaled domain. Losses stay on the device until the search of a group ends.
"""

from __future__ import annotations

import logging
import time

import torch

from ptq.methods.base import Method
from ptq.methods.rtn import round_linears
from ptq.methods.scaling import BlockGroup, fold_scales, resolve_groups
from ptq.methods.stats import (
    add_gram,
    all_sum,
    all_sum_int,
    complete_gram,
    gather_rows,
    half_precision_products,
    quadratic_form_sum,
    split_bf16,
    world,
)
from ptq.models import arch_for, block_scale_groups, get_weight, scale_groups, set_weight
from ptq.pipeline import BlockContext
from ptq.quant import WeightSpec, fake_quantize_weight, group_rows, row_params

log = logging.getLogger(__name__)


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def weight_channel_mean(weights: list[torch.Tensor], spec: WeightSpec) -> torch.Tensor:
    """Mean over rows of |W| normalized by each quantization group's max (AutoAWQ's duo scaling)."""
    w = torch.cat([x.float() for x in weights]).abs()
    rows, columns = w.shape
    grouped = group_rows(w, spec).reshape(rows, spec.num_groups(columns), -1)
    normalized = grouped / (grouped.amax(dim=2, keepdim=True) + 1e-6)
    return normalized.reshape(rows, -1)[:, :columns].mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s = x_mean^alpha (or x_mean^alpha / w_mean^(1-alpha)), clamped and normalized as the reference."""
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    else:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quantize(
    weight: torch.Tensor, s: torch.Tensor, spec: WeightSpec, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1, the weights AWQ tries for scales s, in W's dtype (computed in fp32).
    Written into ``out`` when given (a module's weight: no further copy)."""
    rounded = fake_quantize_weight(torch.mul(weight, s), spec)  # fp32 (type promotion): one pass, no copy
    return torch.div(rounded, s, out=torch.empty_like(weight) if out is None else out)


CLIP_BATCH_ELEMENTS = 2**26  # weights searched at once: 256 MB in fp32 (a few such are alive)


def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    spec: WeightSpec,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    batch_elements: int = CLIP_BATCH_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clipping threshold [rows, groups] for a [rows, columns] weight, given input tokens
    x [tokens, columns]: the candidate max|w| * (1 - i/n_grid), i < max_shrink * n_grid, whose
    rounded weights give the lowest mean squared output error of the group's partial product.
    Returns the thresholds and the chosen ratios (1 - i/n_grid).

    The error of a group's weights w_q - w over the tokens is mean_t (x_t . e)^2 = e G e^T / tokens,
    with G = X_g^T X_g the group's [g, g] input Gram matrix: the same number as running the tokens
    (the reference does), with g instead of ``tokens`` products per weight. Rows are searched in
    batches of about ``batch_elements`` weights."""
    rows, columns = weight.shape
    g, n = spec.group_size_for(columns), spec.num_groups(columns)
    w_all = group_rows(weight.float(), spec).reshape(rows, n, g)
    x = group_rows(x.float(), spec).reshape(-1, n, g).transpose(0, 1)  # [groups, tokens, g]
    gram = torch.bmm(x.transpose(1, 2), x).div_(x.shape[1])  # [groups, g, g]
    rows_per_batch = max(1, batch_elements // (n * g))
    tensor_scale = spec.tensor_scale(weight)  # NVFP4: the unclipped weight's global scale
    ratios = []
    for w in w_all.split(rows_per_batch):
        original_max = w.abs().amax(dim=2, keepdim=True)
        best_err = torch.full(original_max.shape[:2], float("inf"), device=w.device)
        best_ratio = torch.ones_like(best_err)
        for i in range(int(max_shrink * n_grid)):
            ratio = 1 - i / n_grid
            clipped = torch.clamp(w, -original_max * ratio, original_max * ratio).reshape(-1, g)
            scale, zero = row_params(clipped, spec, tensor_scale)
            error = spec.fake_quantize(clipped, scale, zero).reshape(w.shape).sub_(w).transpose(0, 1)
            err = (torch.bmm(error, gram) * error).sum(dim=2).t()  # [rows, groups]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, ratio, best_ratio)
        ratios.append(best_ratio)
    ratio = torch.cat(ratios)
    return w_all.abs().amax(dim=2) * ratio, ratio


def apply_clip(weight: torch.Tensor, max_val: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Clamp each group of ``weight`` to [-max_val, max_val] (max_val: [rows, groups])."""
    columns = weight.shape[1]
    bound = max_val.repeat_interleave(spec.group_size_for(columns), dim=1)[:, :columns]
    return torch.clamp(weight.float(), -bound, bound).to(weight.dtype)


class AWQ(Method):
    name = "awq"
    needs_calibration = True
    transform = True

    def __init__(
        self,
        spec: WeightSpec,
        n_grid: int = 20,
        duo_scaling: bool = False,
        clip: bool = True,
        clip_grid: int = 20,
        clip_max_shrink: float = 0.5,
        clip_tokens: int = 512,
        search_tokens: int | None = 65536,
    ) -> None:
        super().__init__(spec)
        checks = [("n_grid", n_grid), ("clip_grid", clip_grid), ("clip_tokens", clip_tokens)]
        if search_tokens is not None:
            checks.append(("search_tokens", search_tokens))
        for key, value in checks:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"awq.{key}={value!r} must be a whole number of at least 1")
        if clip and spec is not None and spec.per_tensor:
            raise ValueError(
                "awq.clip searches a clipping range per group, which one scale per tensor (group_size=0) "
                "cannot use: set method.awq.clip=false or choose group or channel scales"
            )
        if not isinstance(clip_max_shrink, (int, float)) or not 0 < clip_max_shrink < 1:
            raise ValueError(f"awq.clip_max_shrink={clip_max_shrink!r} must lie strictly between 0 and 1 (default 0.5)")
        self.n_grid = n_grid
        self.duo_scaling = duo_scaling
        self.clip = clip
        self.clip_grid = clip_grid
        self.clip_max_shrink = float(clip_max_shrink)
        self.clip_tokens = clip_tokens
        self.search_tokens = search_tokens
        self.groups = None
        self.no_clip: tuple[str, ...] = ()

    def prepare(self, config) -> None:
        self.groups = scale_groups(config)
        self.arch = arch_for(config.model_type)
        self.no_clip = self.arch.no_clip

    def _rank_tokens(self) -> int | None:
        """``search_tokens`` of this rank: data-parallel ranks share the budget (each its first windows)."""
        return None if self.search_tokens is None else max(1, self.search_tokens // world()[1])

    # -- scale search ------------------------------------------------------------------------

    def search_scale(
        self, group: BlockGroup, calls: list[tuple[tuple, dict]]
    ) -> tuple[torch.Tensor, float, torch.Tensor]:
        """Best scales for ``group`` given the calls of its compared module; also alpha and all losses."""
        inputs = [_input(args, kwargs) for args, kwargs in calls]
        channels = group.channels
        # (a data-parallel rank whose windows never reached an expert has no inputs of its own for it)
        device = inputs[0].device if inputs else get_weight(next(iter(group.linears.values()))).device
        x_mean = torch.zeros(channels, device=device)
        tokens = 0
        for x in inputs:
            x = x.reshape(-1, channels)
            x_mean += x.abs().float().sum(dim=0)
            tokens += x.shape[0]
        tokens = all_sum_int(tokens, x_mean.device)  # data-parallel ranks: the statistics of every rank's windows
        x_mean = all_sum(x_mean) / tokens
        originals = {name: get_weight(linear).clone() for name, linear in group.linears.items()}
        w_mean = weight_channel_mean(list(originals.values()), self.spec) if self.duo_scaling else None
        loss_of = self._gram_loss(group, inputs, tokens) if self._compares_one_linear(group) else None
        if loss_of is None:
            references = [_output(group.inspect(*args, **kwargs)) for args, kwargs in calls]

        losses, candidates = [], []
        for i in range(self.n_grid):
            s = candidate_scales(x_mean, i / self.n_grid, w_mean)
            if loss_of is not None:
                (weight,) = originals.values()
                losses.append(loss_of(scaled_fake_quantize(weight, s, self.spec)))
            else:
                for name, linear in group.linears.items():
                    scaled_fake_quantize(originals[name], s, self.spec, out=get_weight(linear))
                total = torch.zeros((), device=x_mean.device)
                count = 0
                for (args, kwargs), reference in zip(calls, references, strict=True):
                    out = _output(group.inspect(*args, **kwargs))
                    # The difference in the outputs' dtype, squared and summed in fp32: for bf16 each
                    # term is off by <= 2^-8 relative, independently, so the sum by ~2^-8 / sqrt(terms).
                    total += torch.linalg.vector_norm(out - reference, dtype=torch.float32).square()
                    count += out.numel()
                losses.append(torch.stack([total, torch.tensor(float(count), device=total.device)]))
            candidates.append(s)
        for name, linear in group.linears.items():
            set_weight(linear, originals[name])
        losses = torch.stack(losses)
        if loss_of is None:  # [candidates, (squared error, outputs)] summed over the ranks' windows
            losses = all_sum(losses)
            losses = losses[:, 0] / losses[:, 1]
        best = int(torch.argmin(losses))  # the one host synchronization of the search
        return candidates[best], best / self.n_grid, losses

    @staticmethod
    def _compares_one_linear(group: BlockGroup) -> bool:
        return len(group.linears) == 1 and next(iter(group.linears.values())) is group.inspect

    @staticmethod
    def _gram_loss(group: BlockGroup, inputs: list[torch.Tensor], tokens: int):
        """Output MSE of a lone linear from its inputs' Gram matrix: mean over tokens and rows of (E x)^2.
        With bf16/fp16 activations on CUDA, G is built and applied on the tensor cores (ptq/methods/stats.py)."""
        (linear,) = group.linears.values()
        channels = group.channels
        original = get_weight(linear)
        gram = torch.zeros(channels, channels, device=original.device)
        for x in inputs:
            add_gram(gram, x.reshape(-1, channels))
        complete_gram(gram)
        all_sum(gram)  # ``tokens`` is already the count over ranks
        gram_parts = split_bf16(gram) if half_precision_products(inputs[0] if inputs else original) else None

        def loss(trial: torch.Tensor) -> torch.Tensor:
            error = trial.to(torch.float32, copy=True).sub_(original)
            return quadratic_form_sum(error, gram, gram_parts) / (tokens * error.shape[0])

        return loss

    def _lone_run(self, groups: list[BlockGroup]) -> list[BlockGroup | None]:
        """The trailing run of groups that each compare one linear (a MoE block's experts' up -> down),
        when there are several; else [None]."""
        run: list[BlockGroup] = []
        for group in reversed(groups):
            if not self._compares_one_linear(group):
                break
            run.insert(0, group)
        return run if len(run) > 1 else [None]

    def _capture_lone_inputs(self, ctx: BlockContext, run: list[BlockGroup]) -> dict[str, list]:
        """The inputs of every lone linear of ``run``, from one forward pass instead of one each. The
        experts read disjoint tokens and each one's scales touch only its own weights, so this pass sees
        what each group's own pass would."""
        start = time.perf_counter()
        inputs: dict[str, list] = {group.group.inspect: [] for group in run}
        modules = {group.group.inspect: group.inspect for group in run}
        ctx.forward_with_input_hooks(modules, lambda name, x: inputs[name].append(((x,), {})), self._rank_tokens())
        ctx.add_time("scale_search_s", time.perf_counter() - start)
        return inputs

    # -- clipping ----------------------------------------------------------------------------

    def _clip(self, ctx: BlockContext) -> None:
        targets = {name: linear for name, linear in ctx.linears.items() if name not in self.no_clip}
        if not targets:
            return
        # Every step-th token of the tokens the scale search read (the reference samples its whole
        # 128 x 512 calibration set the same way): one forward over those chunks, not all of them.
        total = sum(chunk.shape[0] * chunk.shape[1] for chunk in ctx.chunks(self._rank_tokens()))
        step = max(1, all_sum_int(total, ctx.device) // self.clip_tokens)
        samples: dict[str, list[torch.Tensor]] = {name: [] for name in targets}

        def keep(name: str, x: torch.Tensor) -> None:
            samples[name].append(x.reshape(-1, x.shape[-1])[::step])

        ctx.forward_with_input_hooks(targets, keep, self._rank_tokens())
        for name, linear in targets.items():
            weight = get_weight(linear)
            # every rank's samples, in rank order (the windows' order): the same tokens on every rank
            kept = torch.cat(samples[name]) if samples[name] else weight.new_zeros(0, weight.shape[1])
            samples[name] = gather_rows(kept)
            if samples[name].shape[0] * step < ctx.min_tokens:  # an expert without tokens
                ctx.stats.setdefault(name, {})["fallback"] = "rtn"
                continue
            x = samples[name][: self.clip_tokens]
            max_val, ratio = search_clip(weight, x, self.spec, self.clip_grid, self.clip_max_shrink)
            set_weight(linear, apply_clip(weight, max_val, self.spec))
            ctx.stats.setdefault(name, {})["awq_clip_mean_ratio"] = ratio.mean().item()

    def quantize_block(self, ctx: BlockContext) -> None:
        if self.groups is None:
            raise RuntimeError("AWQ.prepare(config) must run before quantize_block")
        groups = resolve_groups(ctx.block, block_scale_groups(self.arch, ctx.block), ctx.index)
        run = self._lone_run(groups)
        shared: dict[str, list] = {}
        for group in groups:
            if group is run[0]:  # the folds before it are done: capture the whole run's inputs at once
                shared = self._capture_lone_inputs(ctx, run)
            start = time.perf_counter()
            calls = shared.pop(group.group.inspect, None)
            if calls is None:
                calls = ctx.capture_calls(group.inspect, self._rank_tokens())
            tokens = all_sum_int(sum(_input(args, kwargs).shape[:-1].numel() for args, kwargs in calls), ctx.device)
            if len(group.linears) == 1:  # a lone linear (an expert's down_proj): the tokens it was sent
                ctx.stats.setdefault(next(iter(group.linears)), {})["tokens"] = tokens
            if tokens < ctx.min_tokens:  # an expert the router (almost) never chose: no scales, and say so
                for name in group.linears:
                    ctx.stats.setdefault(name, {})["fallback"] = "rtn"
                continue
            scales, alpha, losses = self.search_scale(group, calls)
            del calls
            fold_scales(ctx.block, group, scales)
            stats = {"awq_alpha": alpha, "awq_loss": losses.min().item(), "awq_loss_alpha0": losses[0].item()}
            for name in group.linears:
                ctx.stats.setdefault(name, {}).update(stats)
            seconds = time.perf_counter() - start  # (.item() above waited for the device)
            ctx.add_time("scale_search_s", seconds)
            ctx.add_time(f"scale_search[{group.group.inspect}]_s", seconds)
        if self.clip:
            start = time.perf_counter()
            self._clip(ctx)
            ctx.add_time("clip_search_s", time.perf_counter() - start)
        if self.round_weights:
            round_linears(ctx, self.spec)
        alphas = ", ".join(
            f"{name.split('.')[-1]} {stats['awq_alpha']:.2f}"
            for name, stats in ctx.stats.items()
            if "awq_alpha" in stats
        )
        log.info("block %d AWQ alphas: %s", ctx.index + 1, alphas)
