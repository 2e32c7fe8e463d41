"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), following IST-DASLab/gptq's ``fasterquant`` (Algorithm 1 of the paper).

Per linear layer, with H = 2/n * sum over calibration tokens of x x^T (Eq. 1's Hessian):
quantize the weight columns one at a time, and after each column spread its rounding error over the
columns not yet quantized, weighted by the upper Cholesky factor of H^-1 (Eq. 3 / Algorithm 1).
Updates are applied lazily in blocks of ``block_size`` columns (Section 4, step 2).

Linears that read the same input (q/k/v, gate/up) share one H, so their weights are stacked by rows
and solved together: one Cholesky factorization and one column loop for the group.

One deliberate difference from the reference: when a quantization group starts inside a lazy block,
its scale is computed from the weights *with* the pending updates of that block applied. The
reference reads the not-yet-updated weights there, which makes its result depend on ``block_size``;
here every block size gives the same result as the unblocked algorithm.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ptq.methods import gptq_kernel
from ptq.methods.base import Method
from ptq.methods.rtn import round_group
from ptq.methods.stats import (
    GRAM_PRODUCTS,
    add_gram,
    all_gather_shares,
    broadcast_object,
    broadcast_tensors,
    complete_gram,
    reduce_named,
    row_share,
    world,
)
from ptq.models import get_weight
from ptq.pipeline import BlockContext
from ptq.quant import QuantizedWeight, WeightSpec, group_qparams
from ptq.quant.weight import split_fields

log = logging.getLogger(__name__)
LOOPS = ("auto", "torch")  # the column loop: the Triton kernel where it applies, or always PyTorch
FACTOR_BATCH_BYTES = 2**31  # the largest stack of Hessians factored at once (a MoE stage's experts)


TRIANGULAR_LEAF = 1024  # below this size a triangular inverse is one solve against the identity


def invert_lower_triangular(L: torch.Tensor, leaf: int = TRIANGULAR_LEAF) -> torch.Tensor:
    """L^-1 of lower-triangular matrices [..., n, n], by halves (LAPACK's trtri, blocked):
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]. That is 2n^3/3 multiply-adds in matrix
    products, where a triangular solve against the identity (cuBLAS trsm) does n^3 of them."""
    out = torch.zeros_like(L)
    _invert_lower_into(L, out, leaf)
    return out


def _invert_lower_into(L: torch.Tensor, out: torch.Tensor, leaf: int) -> None:
    n = L.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device).expand_as(L)
        out.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return
    h = n // 2 if n < 128 else n // 128 * 64  # halves on a multiple of 64: whole tiles for the products
    _invert_lower_into(L[..., :h, :h], out[..., :h, :h], leaf)
    _invert_lower_into(L[..., h:, h:], out[..., h:, h:], leaf)
    out[..., h:, :h] = (out[..., h:, h:] @ L[..., h:, :h]) @ out[..., :h, :h]
    out[..., h:, :h].neg_()


def upper_cholesky_of_inverse(flipped: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """U upper-triangular with U^T U = H^-1, given J H J ([..., n, n]; J reverses the order), from one
    Cholesky factorization and no explicit inverse of H: J H J = M M^T with M lower gives
    H^-1 = (J M^-T J)(J M^-1 J), and U = J M^-1 J is upper-triangular with a positive diagonal, so it is
    the Cholesky factor GPTQ uses (Algorithm 1's Cholesky(H^-1)^T). Half the work of factoring H,
    inverting it from that factor and factoring the inverse.

    Returns (U, None) with ``flipped``'s memory released (two [n, n] matrices alive at most, plus the
    inversion's temporaries of half that), or (None, J H J) when some J H J is not (numerically) positive
    definite or U is not finite, to retry with more damping."""
    M, info = torch.linalg.cholesky_ex(flipped)
    if info.any():
        return None, flipped
    flipped.untyped_storage().resize_(0)  # M M^T gives it back if the inverse is not finite (rare)
    inverse = invert_lower_triangular(M)
    if not torch.isfinite(inverse.sum()):  # (isfinite(inverse) would take 1.4 GB of temporaries at 8B)
        return None, M @ M.mT
    return torch.ops.aten.flip.out(inverse, [-2, -1], out=M), None  # U in M's memory


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float, max_tries: int = 6) -> tuple[torch.Tensor, dict]:
    """Upper Cholesky factor of (H + damp*I)^-1, damp = percdamp * mean(diag H). Consumes H (its memory
    is released).

    If H + damp*I is not positive definite (numerically), the damping is multiplied by 10 and the
    factorization retried; the damping actually used is returned so that it can be recorded.
    At most two [n, n] matrices are alive at a time (Llama-3-8B's down_proj: 822 MB each), plus the
    triangular inverse's temporaries.
    """
    mean_diag = torch.mean(torch.diagonal(H))
    flipped = H.flip((0, 1))  # J H J: see upper_cholesky_of_inverse
    H.untyped_storage().resize_(0)
    damp_fraction, added = percdamp, 0.0
    for attempt in range(max_tries):
        flipped.diagonal().add_(damp_fraction * mean_diag - added)
        added = damp_fraction * mean_diag
        U, flipped = upper_cholesky_of_inverse(flipped)
        if U is not None:
            return U, {"percdamp": damp_fraction, "retries": attempt}
        log.warning(
            "Hessian not positive definite with percdamp=%g; retrying with %g", damp_fraction, damp_fraction * 10
        )
        damp_fraction *= 10
    raise FloatingPointError(f"Hessian stayed non-positive-definite up to percdamp={damp_fraction / 10:g}")


@dataclass
class Factor:
    """What GPTQ needs of a Hessian before the column loop: the upper Cholesky factor of the damped
    inverse (in ``perm`` order), the permutation (act-order; None without), the inputs that were always
    zero (``dead``) and the solver info (damping used)."""

    hinv: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    info: dict


def factor_hessians(hessians: list[torch.Tensor], percdamp: float, act_order: bool) -> list[Factor] | None:
    """``inverse_hessian_cholesky`` for many Hessians of one size at once (a MoE block's experts): a
    few batched factorizations instead of hundreds of small ones, each with its own host syncs. The
    Hessians are consumed on success. None if any needs more damping than ``percdamp`` (the caller then
    factors them one by one, with the retries; the Hessians are left as they were)."""
    H = torch.stack(hessians)
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1)
    perm = None
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)
        n = H.shape[-1]
        H = torch.gather(H, 1, perm[:, :, None].expand(-1, -1, n))
        H = torch.gather(H, 2, perm[:, None, :].expand(-1, n, -1))
        diag = H.diagonal(dim1=-2, dim2=-1)
    diag.add_(percdamp * diag.mean(dim=-1, keepdim=True))
    flipped = H.flip((-2, -1))
    del H, diag
    U, _ = upper_cholesky_of_inverse(flipped)
    if U is None:
        return None
    for h in hessians:  # consumed: their memory goes now, not when the last expert is solved
        h.untyped_storage().resize_(0)
    solver = {"percdamp": percdamp, "retries": 0}
    return [Factor(U[i], None if perm is None else perm[i], dead[i], solver) for i in range(U.shape[0])]


def factor_hessian(H: torch.Tensor, percdamp: float, act_order: bool, work: torch.dtype, consume: bool) -> Factor:
    """``Factor`` of one Hessian: inputs that were always zero marked dead (their diagonal set to 1), columns in
    act-order when asked, the damped inverse's upper Cholesky factor. ``consume``: H may be overwritten, and its
    memory is released once the factor exists."""
    given = H
    H = H.to(work) if consume else H.to(work).clone()
    dead = torch.diagonal(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    hinv, info = inverse_hessian_cholesky(H, percdamp)
    del H
    if consume:  # the caller's reference would keep H (822 MB for an 8B down_proj) alive through the solve
        given.untyped_storage().resize_(0)
    return Factor(hinv, perm, dead, info)


def group_weights(W, W1, Err1, Hinv, i1: int, i2: int, col: int, group: int) -> torch.Tensor:
    """The current weights of the group starting at column ``col`` inside the lazy block i1..i2: in-block columns
    from W1 (already updated), later columns from W plus the updates this block has not yet propagated to them."""
    end = min(col + group, W.shape[1])
    current = W1[:, col - i1 : min(end, i2) - i1]
    if end > i2:
        current = torch.cat([current, W[:, i2:end] - Err1 @ Hinv[i1:i2, i2:end]], dim=1)
    return current


def _lazy_block_loop(
    W, Hinv, i1, i2, codes, scale, zero, group, group_list, spec, static_groups, tensor_scale
) -> torch.Tensor:
    """Columns i1..i2 one at a time (Algorithm 1's inner loop); returns the block's scaled errors."""
    W1 = W[:, i1:i2].clone()
    Err1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
        col = i1 + i
        if not static_groups and col % group == 0:
            s, z = spec.params(group_weights(W, W1, Err1, Hinv, i1, i2, col, group), tensor_scale)
            scale[:, col // group], zero[:, col // group] = s[:, 0], z[:, 0]
        g = group_list[col]
        s, z = scale[:, g], zero[:, g]
        w = W1[:, i]
        c = spec.quantize(w, s, z)
        codes[:, col] = c
        err = (w - spec.dequantize(c, s, z)) / Hinv1[i, i]
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
        Err1[:, i] = err
    return Err1


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: WeightSpec,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    consume: bool = False,
    loop: str = "auto",
    factor: Factor | None = None,
) -> tuple[QuantizedWeight, torch.Tensor, dict]:
    """Quantize a [rows, columns] weight with the GPTQ solver given its input Hessian [columns, columns].

    Works in fp32 (float64 if given float64). Returns the quantized weight (codes, group scales and
    zeros, ``g_idx`` in original column order), the per-row reconstruction loss, and solver info.
    ``loop``: ``auto`` runs each lazy block's column loop as one Triton kernel where it applies (CUDA),
    ``torch`` always in PyTorch. ``consume``: H (already fp32/fp64) may be overwritten, saving a copy,
    and its memory is released (its storage emptied) as soon as the inverse factor exists. W is never
    modified; its fp32 working copy is made only after the factorization, so the two are not alive
    together at the solve's memory peak (Llama-3-8B's down_proj: H and each factorization temporary).
    ``factor``: H already factored (``factor_hessians``); H is then not read.
    """
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    rows, columns = W.shape
    group = spec.group_size_for(columns)
    factor = factor or factor_hessian(H, percdamp, act_order, work, consume)
    Hinv, perm, dead, info = factor.hinv.to(work), factor.perm, factor.dead, dict(factor.info)
    del factor

    # NVFP4's global scale, and a per-tensor scale, come from the original weights: GPTQ's updates
    # must not move the range every group's scale is expressed in.
    static_groups = static_groups or spec.per_tensor
    original = W.to(work).masked_fill(dead, 0)
    tensor_scale = spec.tensor_scale(original)
    if static_groups:  # group parameters from the original weights, before any column is updated
        static_scale, static_zero = group_qparams(original, spec, tensor_scale)
    del original
    W = W.to(work, copy=True).masked_fill_(dead, 0)
    if perm is not None:
        W = W[:, perm]

    num_groups = spec.num_groups(columns)
    scale = torch.zeros(rows, num_groups, dtype=work, device=W.device)
    zero = torch.zeros_like(scale)
    codes = torch.zeros_like(W)
    losses = torch.zeros(rows, dtype=work, device=W.device)
    group_of = torch.arange(columns, device=W.device) // group  # group of each column, in solve order
    if static_groups:
        original = perm if perm is not None else torch.arange(columns, device=W.device)
        group_of = original // group
        scale, zero = static_scale.to(work), static_zero.to(work)

    # On CUDA the column loop of each lazy block runs as one Triton kernel when the groups' parameters
    # are known before the block (static groups, per channel) or start on block boundaries.
    per_channel = group == columns
    groups_known = static_groups or per_channel
    kernel = (
        loop == "auto" and gptq_kernel.available(W, spec, groups_known) and (groups_known or block_size % group == 0)
    )
    element = None if spec.is_int else spec.fmt.element
    maxq = spec.maxq if element is None else element.max
    if kernel:
        Hinv = Hinv.contiguous()  # cuSOLVER may return the factor column-major; the kernel reads rows
    if kernel and per_channel and not static_groups:  # what the loop computes at column 0: W's own range
        s, z = spec.params(W, tensor_scale)
        scale[:, 0], zero[:, 0] = s[:, 0], z[:, 0]
    group_list = group_of.tolist()  # python ints: indexing by them launches no kernel
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if kernel:
            Err1 = torch.empty(rows, i2 - i1, dtype=work, device=W.device)
            if static_groups or per_channel:
                cols = group_of[i1:i2]
                s, z = scale[:, cols].contiguous(), zero[:, cols].contiguous()
                gptq_kernel.lazy_block(W[:, i1:i2], Hinv1, codes[:, i1:i2], Err1, s, z, maxq, 0, spec.sym, element)
            else:
                g = slice(i1 // group, (i2 - 1) // group + 1)
                gptq_kernel.lazy_block(
                    W[:, i1:i2], Hinv1, codes[:, i1:i2], Err1, scale[:, g], zero[:, g], maxq, group, spec.sym
                )
        else:
            Err1 = _lazy_block_loop(
                W, Hinv, i1, i2, codes, scale, zero, group, group_list, spec, static_groups, tensor_scale
            )
        # Loss of each column: (w - q)^2 / [H^-1]_jj^2 / 2 (the reference's Losses), i.e. err^2 / 2.
        losses += (Err1**2).sum(dim=1) / 2
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # in place: no [rows, columns] temporary

    g_idx = group_of.to(torch.int32)
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, g_idx = codes[:, inverse], g_idx[inverse]
    qweight = QuantizedWeight(spec.fmt.encode(codes), scale, zero, g_idx, spec, tensor_scale)
    return qweight, losses, info


def gptq_step(recipe) -> GPTQ | None:
    """The GPTQ step a recipe runs, with its options resolved (defaults filled in); None without GPTQ."""
    if "gptq" not in recipe.steps:
        return None
    return GPTQ(recipe.weights, **recipe.options.get("gptq", {}))


class GPTQ(Method):
    """GPTQ as a pipeline step. By default columns go in order of decreasing diag(H) (``act_order``)
    with group scales from the original weights (``static_groups``), as llm-compressor does: better
    than the reference order, and free at inference since groups stay contiguous. The reference's
    order is ``act_order=False, static_groups=False`` (``method=gptq-reference`` on the command line)."""

    name = "gptq"
    label = "GPTQ"  # in the log
    needs_calibration = True
    splits_rows = True  # under torchrun a lone group's rows may be solved by share (rows are independent given H)

    def __init__(
        self,
        spec: WeightSpec,
        block_size: int = 128,
        percdamp: float = 0.01,
        act_order: bool = True,
        static_groups: bool = True,
        true_sequential: bool = True,
        hessian: str = "auto",
        loop: str = "auto",
    ) -> None:
        super().__init__(spec)
        if loop not in LOOPS:
            raise ValueError(f"gptq.loop={loop!r} is unknown; choose one of {', '.join(LOOPS)}")
        self.loop = loop
        if hessian not in GRAM_PRODUCTS:
            raise ValueError(f"gptq.hessian={hessian!r} is unknown; choose one of {', '.join(GRAM_PRODUCTS)}")
        self.hessian = hessian
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"gptq.block_size={block_size!r} must be a whole number of at least 1 (default 128)")
        if not isinstance(percdamp, (int, float)) or not percdamp > 0:
            raise ValueError(f"gptq.percdamp={percdamp!r} must be positive (default 0.01)")
        self.block_size = block_size
        self.percdamp = float(percdamp)
        self.act_order = act_order
        self.static_groups = static_groups
        self.true_sequential = true_sequential

    def solve_weight(self, W: torch.Tensor, H: torch.Tensor, factor: Factor | None, parts: list[int] | None = None):
        """(quantized weight, per-row loss, solver info) of one group's stacked weight; H is consumed. ``parts``:
        the rows of each linear in the stack (AQLM codes each apart; GPTQ's rows are independent anyway)."""
        return gptq_quantize(
            W, H, self.spec, self.block_size, self.percdamp, self.act_order, self.static_groups, consume=True,
            loop=self.loop, factor=factor,
        )  # fmt: skip

    def _hessians(self, ctx: BlockContext, groups: list[tuple[str, ...]]) -> dict[str, torch.Tensor | None]:
        """H = 2/n * X^T X for the input of each group (read at the group's first linear), fp32; None for
        a group whose input saw fewer than ``ctx.min_tokens`` tokens (an expert the router rarely chose).
        The tokens each group saw go into its stats."""
        readers = {group[0]: ctx.linears[group[0]] for group in groups}
        sums: dict[str, torch.Tensor] = {}
        tokens = dict.fromkeys(readers, 0)

        def accumulate(name: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1])
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            add_gram(sums[name], x, self.hessian)
            tokens[name] += x.shape[0]

        # each stage changes only its own groups' weights before the next pass: the pipeline may keep what this
        # pass computed, and the next pass continue from there
        ctx.forward_with_input_hooks(readers, accumulate, keep=True)
        sums = {name: complete_gram(total) for name, total in sums.items()}
        # Data-parallel ranks: each saw its share of the windows; every rank gets the sums over all of them.
        width = {name: get_weight(linear).shape[1] for name, linear in readers.items()}
        sums = reduce_named(sums, readers, "sum", lambda name: torch.zeros(width[name], width[name], device=ctx.device))
        counts = {name: torch.tensor([float(n)], dtype=torch.float64) for name, n in tokens.items()}
        tokens = {name: int(t.item()) for name, t in reduce_named(counts, readers, "sum", None).items()}
        for group in groups:
            for name in group:
                ctx.stats.setdefault(name, {})["tokens"] = tokens[group[0]]
        return {name: sums[name].mul_(2 / n) if n >= ctx.min_tokens else None for name, n in tokens.items()}

    def _factor_stage(self, hessians: dict[str, torch.Tensor | None]) -> dict[str, Factor]:
        """Batched factorizations for a stage with many Hessians of one size (a MoE block's experts), in
        stacks of at most ``FACTOR_BATCH_BYTES``; {} for a dense block's single group."""
        by_size: dict[int, list[str]] = {}
        for name, H in hessians.items():
            if H is not None:
                by_size.setdefault(H.shape[0], []).append(name)
        factors: dict[str, Factor] = {}
        for n, names in by_size.items():
            if len(names) < 2:
                continue
            per_stack = max(1, FACTOR_BATCH_BYTES // (n * n * 4))
            for i in range(0, len(names), per_stack):
                chunk = names[i : i + per_stack]
                done = factor_hessians([hessians[name] for name in chunk], self.percdamp, self.act_order)
                if done is not None:  # else some need more damping: ``_solve`` factors them one by one, with retries
                    factors.update(zip(chunk, done, strict=True))
        return factors

    def _solve(
        self,
        ctx: BlockContext,
        group: tuple[str, ...],
        hessians: dict[str, torch.Tensor],
        factor: Factor | None = None,
        split_rows: bool = False,
    ) -> None:
        """Solve ``group``, consuming its Hessian: popped here, so that the solver can free its memory
        as soon as the inverse factor exists (Llama-3-8B's down_proj: 822 MB). ``split_rows``: every
        data-parallel rank calls this for the group; each solves its share of the output rows (GPTQ treats
        rows independently given H) and the shares are gathered (formats with one scale over the whole
        tensor, NVFP4's, are solved whole on every rank instead)."""
        start = time.perf_counter()
        if hessians[group[0]] is None:  # too few tokens for a Hessian: round to nearest, and say so
            hessians.pop(group[0])
            round_group(ctx, group, self.spec)
            for name in group:
                ctx.stats[name].update(fallback="rtn")
            log.info("block %d %s: %d calibration tokens, fewer than min_tokens=%d: rounded to nearest",
                     ctx.index + 1, "/".join(group), ctx.stats[group[0]]["tokens"], ctx.min_tokens)  # fmt: skip
            return
        weights = [get_weight(ctx.linears[name]) for name in group]
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]  # in the model's dtype
        rows = stacked.shape[0]
        split_rows = split_rows and self.splits_rows and world()[1] > 1 and not self.spec.fmt.has_tensor_scale
        start_row, stop_row = row_share(rows) if split_rows else (0, rows)
        parts = None if split_rows else [w.shape[0] for w in weights]
        qweight, losses, info = self.solve_weight(stacked[start_row:stop_row], hessians.pop(group[0]), factor, parts)
        del stacked
        if split_rows:  # every rank's rows, on every rank
            qweight = QuantizedWeight(
                all_gather_shares(qweight.qweight, rows), all_gather_shares(qweight.scale, rows),
                all_gather_shares(qweight.zero, rows), qweight.g_idx, qweight.spec, qweight.tensor_scale,
            )  # fmt: skip
            losses = all_gather_shares(losses, rows)
        if not torch.isfinite(qweight.scale).all():
            raise FloatingPointError(f"GPTQ produced non-finite scales in block {ctx.index} {group}")
        if qweight.scale.is_cuda:
            torch.cuda.synchronize(qweight.scale.device)
        ctx.add_time("solve_s", time.perf_counter() - start)
        row = 0
        own = info.pop("parts", None)  # solver info per linear of the stack, where the solver gives it (AQLM)
        for i, (name, w) in enumerate(zip(group, weights, strict=True)):
            rows = w.shape[0]
            part = qweight.rows(row, row + rows)
            ctx.set_quantized(name, part)
            loss = losses[row : row + rows].sum().item()
            ctx.stats.setdefault(name, {}).update(loss=loss, **(own[i] if own else info))
            if hasattr(part, "outliers"):  # SpQR: this linear's own outliers, not its stacked group's
                ctx.stats[name].update(outliers=part.outliers, outlier_fraction=part.outliers / w.numel())
            log.debug("block %d %s: loss %.4f", ctx.index + 1, name, loss)
            row += rows
        if info["retries"]:
            log.warning("block %d %s: damping raised to percdamp=%g", ctx.index + 1, "/".join(group), info["percdamp"])

    def _solve_spread(self, ctx: BlockContext, batch: list, hessians: dict, rank: int, ranks: int) -> None:
        """A stage's groups dealt out over the data-parallel ranks (group i to rank i mod ranks); each rank
        solves its own, then every result is sent to every rank."""
        mine = [group for i, group in enumerate(batch) if i % ranks == rank]
        owned = {group[0]: hessians[group[0]] for group in mine}
        factors = self._factor_stage(owned) if len(mine) > 1 else {}
        for group in mine:
            self._solve(ctx, group, hessians, factors.pop(group[0], None))
        for i, group in enumerate(batch):
            owner = i % ranks
            hessians.pop(group[0], None)
            # the stats and each weight's kind and non-tensor fields as one small object, the tensors as tensors
            described = None
            if owner == rank:
                described = {name: (ctx.stats[name], *split_fields(ctx.quantized[name])) for name in group}
            described = broadcast_object(described, owner)
            for name, (stats, kind, plain, tensor_names) in described.items():
                held = [getattr(ctx.quantized[name], f) for f in tensor_names] if owner == rank else None
                tensors = broadcast_tensors(held, owner, ctx.device)
                if owner != rank:
                    ctx.set_quantized(name, kind(**plain, **dict(zip(tensor_names, tensors, strict=True))))
                    ctx.stats[name] = stats

    def quantize_block(self, ctx: BlockContext) -> None:
        groups = list(ctx.sequential)
        # true_sequential: each stage's statistics come from a forward pass in which the stages before
        # it are already quantized (a stage: one group, or all the experts of a MoE block, which one pass
        # reaches together). Otherwise one pass collects every group's statistics.
        schedule = [list(stage) for stage in ctx.stages] if self.true_sequential else [groups]
        for batch in schedule:
            start = time.perf_counter()
            hessians = self._hessians(ctx, batch)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            ctx.add_time("hessian_s", time.perf_counter() - start)  # forward pass + statistics
            rank, ranks = world()
            if ranks > 1 and len(batch) > 1:
                self._solve_spread(ctx, batch, hessians, rank, ranks)
                continue
            # One group (a dense block under true_sequential): every rank solves its share of the rows.
            factors = self._factor_stage(hessians) if len(batch) > 1 else {}
            for group in batch:
                self._solve(ctx, group, hessians, factors.pop(group[0], None), split_rows=ranks > 1)
        solved = [name for g in groups for name in g if "loss" in ctx.stats[name]]
        if len(solved) > 16:  # a MoE block: the sum per linear kind instead of hundreds of numbers
            kinds: dict[str, float] = {}
            for name in solved:
                kind = name.split(".")[-1]
                kinds[kind] = kinds.get(kind, 0.0) + ctx.stats[name]["loss"]
            losses = ", ".join(f"{kind} {loss:.3g} (sum)" for kind, loss in kinds.items())
        else:
            losses = ", ".join(f"{name.split('.')[-1]} {ctx.stats[name]['loss']:.3g}" for name in solved)
        log.info("block %d %s losses: %s", ctx.index + 1, self.label, losses)
