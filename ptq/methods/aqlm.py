"""AQLM (Egiazarian et al., 2024, "Extreme Compression of Large Language Models via Additive Quantization").

Each output row of a [rows, columns] weight is cut into groups of ``group`` consecutive input columns; a group is
the sum of one vector from each of ``codebooks`` (M) codebooks of 2^``codebook_bits`` (B) vectors, times the row's
scale:  W[r, jg:(j+1)g] ~= s_r * sum_m C_m[b_rjm]   (the paper's Eq. 2, out_group_size 1).
Codes cost M*B/g bits per weight; the codebooks (fp16) and the scales (fp16 per row) are counted on top.

The objective is the layer's output error on the calibration inputs, ||(W - W^) X^T||^2 = tr(dW H dW^T) with H the
GPTQ Hessian (Eq. 4). Per linear (``aqlm_quantize``):

    init        scales = row norms; codebooks by residual k-means of the scaled weights' groups (§3.1)
    repeat      scales in closed form given the codes (a 1-D least squares per row)
                codebooks by least squares against H with the codes fixed: conjugate gradient on the quadratic
                    (the paper's Adam steps on the same objective; CG converges in far fewer steps)
                codes by beam search (§3.2, Eq. 5-6): per row, over every group and codebook in turn, the code
                    that lowers tr(dW H dW^T) most given all the others, keeping ``beam_size`` hypotheses
    until       the relative error improves by less than ``tolerance`` or after ``rounds``

A candidate code c for group j, codebook m changes the residual e = w/s - q by -(C_c - C_old) on the group's
columns; with G = e H the loss changes by  t(c) - 2 C_c . (G_j + H_jj C_old) + const,  t(c) = C_c^T H_jj C_c:
one [rows, g] x [g, 2^B] product per step, and G is updated by a rank-g product. The old code is always a
candidate, so a sweep never raises a row's error (tested, and checked exactly before codes are accepted).

``finetune_epochs``: after a block's linears are quantized, its codebooks and scales (codes fixed) are tuned with
Adam so that the block's outputs match the full-precision block's on the calibration inputs (§3.3).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptq.errors import UserError
from ptq.methods.gptq import GPTQ, Factor
from ptq.models import get_weight
from ptq.pipeline import BlockContext
from ptq.quant import WeightSpec
from ptq.quant.weight import register_weight_kind

log = logging.getLogger(__name__)
CODEBOOK_VALUE_BITS = 16  # codebook entries and scales are stored in fp16 (the reference's codebook_value_nbits)


def score_bytes(device: torch.device) -> int:
    """The largest score tensor ([rows, beam, 2^B] or [points, centroids]) one step materializes."""
    return 2**30 if device.type == "cuda" else 2**28


class AQLMError(UserError):
    """A model or setting AQLM cannot quantize."""


@register_weight_kind
@dataclass
class AQLMWeight:
    """Codes [rows, groups, M] (int32), codebooks [parts, M, 2^B, g] and per-row scales [rows, 1], both holding
    fp16 values in fp32. ``part_rows``: the rows of each linear stacked in this weight (each has its own codebooks:
    the linears of a group that share an input, q/k/v say, are solved together but coded apart)."""

    codes: torch.Tensor
    codebooks: torch.Tensor
    scale: torch.Tensor
    spec: WeightSpec  # the run's nominal spec: ``bits`` chose the codebook configuration
    part_rows: tuple[int, ...] = ()

    layout = "aqlm"

    def __post_init__(self) -> None:
        self.part_rows = tuple(self.part_rows) or (self.codes.shape[0],)

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * self.codebooks.shape[-1]

    def dequantize(self) -> torch.Tensor:
        rows, groups, _ = self.codes.shape
        out = torch.empty(rows, groups * self.codebooks.shape[-1], dtype=self.codebooks.dtype,
                          device=self.codebooks.device)  # fmt: skip
        start = 0
        for part, count in enumerate(self.part_rows):
            codes = self.codes[start : start + count].long()
            out[start : start + count] = decode(self.codebooks[part], codes).reshape(count, -1)
            start += count
        return out.mul_(self.scale)

    def rows(self, start: int, stop: int) -> AQLMWeight:
        """The linear stacked at rows ``start:stop``, with its own codebooks."""
        bounds = [0, *torch.tensor(self.part_rows).cumsum(0).tolist()]
        if start not in bounds or stop != bounds[bounds.index(start) + 1]:
            raise ValueError(f"rows {start}:{stop} are not one of the stacked linears {self.part_rows}")
        part = bounds.index(start)
        return AQLMWeight(self.codes[start:stop], self.codebooks[part : part + 1], self.scale[start:stop], self.spec)

    def stored_bytes(self) -> int:
        """Codes (M * B bits per group), codebooks (fp16 entries) and the per-row fp16 scales."""
        rows, groups, books = self.codes.shape
        codebook_bits = int(math.log2(self.codebooks.shape[2]))
        bits = rows * groups * books * codebook_bits
        bits += self.codebooks.numel() * CODEBOOK_VALUE_BITS + rows * CODEBOOK_VALUE_BITS
        return math.ceil(bits / 8)


def decode(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """sum_m codebooks[m][codes[..., m]]: [M, K, g] and [..., M] -> [..., g] (differentiable in the codebooks)."""
    return sum(codebooks[m][codes[..., m]] for m in range(codebooks.shape[0]))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Rounded to fp16 and back: the values as stored, so that the quantized model is what a checkpoint holds."""
    return x.half().float()


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each row of ``x`` (squared Euclidean), in chunks of bounded memory."""
    norms = centroids.square().sum(1)
    step = max(1, score_bytes(x.device) // (4 * centroids.shape[0]))
    return torch.cat([(norms - 2 * x[i : i + step] @ centroids.T).argmin(1) for i in range(0, x.shape[0], step)])


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator, max_points: int) -> torch.Tensor:
    """Lloyd's k-means of the rows of ``x`` from ``k`` rows drawn at random (at most ``max_points`` rows of x are
    clustered, a seeded sample); a cluster left empty keeps its centroid. Fewer rows than ``k``: every row is a
    centroid (the rest repeat them)."""
    n = x.shape[0]
    if n <= k:
        return x[torch.arange(k, device=x.device) % n].clone()
    if n > max_points:
        x = x[torch.randperm(n, generator=generator, device=generator.device)[:max_points].to(x.device)]
    centroids = x[torch.randperm(x.shape[0], generator=generator, device=generator.device)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def row_errors(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """[rows]: (w - w^) H (w - w^)^T of each row."""
    E = W - What
    return ((E @ H) * E).sum(1)


def beam_search(
    target: torch.Tensor, H: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, beam_size: int
) -> torch.Tensor:
    """New codes [rows, groups, M] for ``target`` [rows, columns] (the weight over its scales), one sweep over every
    group and codebook, keeping the ``beam_size`` best hypotheses per row; a row keeps its old codes unless the new
    ones are better (exactly recomputed)."""
    rows, columns = target.shape
    books, size, g = codebooks.shape
    # Only the diagonal blocks of H and the interaction rows H[group, :] are read.
    blocks = H.reshape(columns // g, g, columns // g, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [J, g, g]
    chunk = max(1, score_bytes(target.device) // (4 * beam_size * size + 8 * beam_size * columns))
    out = []
    for r0 in range(0, rows, chunk):
        out.append(_beam_rows(target[r0 : r0 + chunk], H, blocks, codebooks, codes[r0 : r0 + chunk], beam_size))
    new = torch.cat(out)
    before = row_errors(target, decode(codebooks, codes.long()).reshape(rows, -1), H)
    after = row_errors(target, decode(codebooks, new.long()).reshape(rows, -1), H)
    return torch.where((after <= before)[:, None, None], new, codes)


def _beam_rows(target, H, blocks, codebooks, codes, beam_size: int) -> torch.Tensor:
    rows, columns = target.shape
    books, size, g = codebooks.shape
    hyp = codes.to(torch.long, copy=True)[:, None]  # [rows, b, J, M], b hypotheses (one to start)
    residual = target - decode(codebooks, codes.long()).reshape(rows, -1)
    G = (residual @ H)[:, None]  # [rows, b, columns]: e H of each hypothesis
    loss = (residual * G[:, 0]).sum(1, keepdim=True)  # [rows, b]
    index = torch.arange(rows, device=target.device)[:, None]
    for j in range(columns // g):
        cols = slice(j * g, (j + 1) * g)
        Hjj = blocks[j]
        for m in range(books):
            C = codebooks[m]  # [K, g]
            t = ((C @ Hjj) * C).sum(1)  # [K]: C_c^T H_jj C_c
            old = hyp[:, :, j, m]
            C_old, G_j = C[old], G[:, :, cols]
            v = G_j + C_old @ Hjj
            base = loss + 2 * (C_old * G_j).sum(-1) + t[old]
            scores = (base[..., None] + t - 2 * v @ C.T).flatten(1)  # [rows, b * K]
            if beam_size == 1:
                best, pick = scores.min(1, keepdim=True)
            else:
                best, pick = scores.topk(min(beam_size, scores.shape[1]), dim=1, largest=False)
            parent, code = pick // size, pick % size
            if hyp.shape[1] > 1 or parent.shape[1] > 1:
                hyp, G, C_old = hyp[index, parent], G[index, parent], C_old[index, parent]
            delta = C[code] - C_old  # [rows, b, g]: the residual falls by this on the group's columns
            G = G - delta @ H[cols]
            hyp[:, :, j, m] = code
            loss = best
    return hyp[index[:, 0], loss.argmin(1)].to(codes.dtype)


def fit_scales(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """[rows, 1]: the scale s_r minimizing (w_r - s_r q_r) H (w_r - s_r q_r)^T, i.e. w H q^T / q H q^T."""
    QH = Q @ H
    return ((W * QH).sum(1) / (Q * QH).sum(1).clamp(min=1e-20))[:, None]


def fit_codebooks(
    W: torch.Tensor, H: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, steps: int
) -> torch.Tensor:
    """Codebooks minimizing tr((W - s*Q(C)) H (W - s*Q(C))^T) with the codes fixed: the normal equations
    A C = B, A(D) = P^T(s * (s * P(D)) H), B = P^T(s * W H), solved by conjugate gradient from the current C
    (P: the codes' gather, P^T its scatter-add)."""
    rows = W.shape[0]
    books, size, g = codebooks.shape
    flat = codes.long().reshape(-1, books)

    def gather(D):
        return decode(D, flat).reshape(rows, -1)

    def scatter(Y):
        Y = (scale * Y).reshape(-1, g)
        return torch.stack([torch.zeros(size, g, dtype=Y.dtype, device=Y.device).index_add_(0, flat[:, m], Y)
                            for m in range(books)])  # fmt: skip

    def apply(D):
        return scatter((scale * gather(D)) @ H)

    C = codebooks.clone()
    r = scatter(W @ H) - apply(C)
    p, rr = r.clone(), (r * r).sum()
    for _ in range(steps):
        Ap = apply(p)
        curvature = (p * Ap).sum()
        if curvature <= 0 or rr == 0:
            break
        alpha = rr / curvature
        C += alpha * p
        r -= alpha * Ap
        rr, previous = (r * r).sum(), rr
        p = r + (rr / previous) * p
    return C


def aqlm_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: WeightSpec,
    codebooks: int = 1,
    codebook_bits: int = 16,
    group: int = 8,
    beam_size: int = 1,
    rounds: int = 8,
    tolerance: float = 0.01,
    cg_steps: int = 25,
    init_iters: int = 10,
    seed: int = 0,
) -> tuple[AQLMWeight, torch.Tensor, dict]:
    """AQLM of one linear's [rows, columns] weight given its input Hessian; returns (weight, per-row loss
    tr(dW H dW^T)/2 in GPTQ's units, solver info)."""
    rows, columns = W.shape
    if columns % group:
        raise AQLMError(f"method.aqlm.group={group} does not divide a linear's {columns} input columns; choose a "
                        "divisor (8 in the paper)")  # fmt: skip
    W, H = W.float(), H.float()
    generator = torch.Generator(W.device).manual_seed(seed)
    scale = _fp16(W.norm(dim=1, keepdim=True).clamp(min=1e-8))
    residual = (W / scale).reshape(-1, group)
    books, codes = [], []
    for _ in range(codebooks):  # residual k-means (the reference's initialization)
        C = kmeans(residual, 2**codebook_bits, init_iters, generator, max_points=32 * 2**codebook_bits)
        code = nearest(residual, C)
        residual = residual - C[code]
        books.append(C)
        codes.append(code)
    C = _fp16(torch.stack(books))
    codes = torch.stack(codes, dim=1).reshape(rows, columns // group, codebooks).to(torch.int32)
    reference = (W @ H * W).sum()  # the error of quantizing everything to zero: the relative scale

    def error(C, codes, scale) -> torch.Tensor:
        return row_errors(W, scale * decode(C, codes.long()).reshape(rows, -1), H)

    first = error(C, codes, scale).sum()
    codes = beam_search(W / scale, H, C, codes, beam_size)
    last, done = error(C, codes, scale).sum(), 0
    while done < rounds:
        done += 1
        scale = _fp16(fit_scales(W, decode(C, codes.long()).reshape(rows, -1), H))
        C = _fp16(fit_codebooks(W, H, C, codes, scale, cg_steps))
        codes = beam_search(W / scale, H, C, codes, beam_size)
        now = error(C, codes, scale).sum()
        improved = (last - now) / last.clamp(min=1e-30)
        last = now
        if improved < tolerance:
            break
    losses = error(C, codes, scale) / 2
    info = {"percdamp": 0.0, "retries": 0, "rounds": done,
            "relative_error_init": (first / reference).item(), "relative_error": (last / reference).item()}  # fmt: skip
    return AQLMWeight(codes, C[None], scale, spec), losses, info


def nominal_codebooks(bits: int, group: int) -> tuple[int, int]:
    """(codebooks, bits per codebook) for ``bits`` per weight with groups of ``group``: ``bits * group`` code bits
    per group in as few codebooks of at most 16 bits as hold them (bits=2: 1x16, bits=3: 2x12, bits=4: 2x16)."""
    total = bits * group
    books = math.ceil(total / 16)
    if total % books:
        raise AQLMError(f"bits={bits} with method.aqlm.group={group} gives {total} code bits per group, which do not "
                        "split into equal codebooks; set method.aqlm.codebooks and codebook_bits")  # fmt: skip
    return books, total // books


class AQLM(GPTQ):
    """AQLM as a pipeline step: GPTQ's calibration (the Hessians, stages, data-parallel reduction), AQLM's solve.
    ``codebooks``/``codebook_bits`` default from the run's ``bits`` (``nominal_codebooks``); ``group`` is the
    paper's in_group_size (the run's ``group_size`` does not apply)."""

    name = "aqlm"
    label = "AQLM"
    splits_rows = False  # the codebooks are shared by all rows of a linear

    def __init__(
        self,
        spec: WeightSpec,
        codebooks: int | None = None,
        codebook_bits: int | None = None,
        group: int = 8,
        beam_size: int = 8,
        rounds: int = 8,
        tolerance: float = 0.01,
        cg_steps: int = 25,
        init_iters: int = 10,
        finetune_epochs: int = 0,
        finetune_lr: float = 1e-4,
        seed: int = 0,
        true_sequential: bool = True,
        hessian: str = "auto",
    ) -> None:
        super().__init__(spec, true_sequential=true_sequential, hessian=hessian)
        if spec is not None and not spec.is_int:
            raise AQLMError("method=aqlm sets its codebooks from an integer bits= budget: drop format (or use int)")
        whole = (("group", group, 1, 64), ("beam_size", beam_size, 1, 256), ("rounds", rounds, 0, 1000),
                 ("cg_steps", cg_steps, 0, 10000), ("init_iters", init_iters, 0, 1000),
                 ("finetune_epochs", finetune_epochs, 0, 1000), ("seed", seed, 0, 2**63 - 1))  # fmt: skip
        for option, value, low, high in whole:
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise AQLMError(f"method.aqlm.{option}={value!r} must be a whole number in {low}..{high}")
        if (codebooks is None) != (codebook_bits is None):
            raise AQLMError("method.aqlm.codebooks and codebook_bits go together: set both, or neither (then bits= "
                            "chooses them)")  # fmt: skip
        if codebooks is None:
            codebooks, codebook_bits = nominal_codebooks(spec.bits if spec is not None else 2, group)
        for option, value, high in (("codebooks", codebooks, 8), ("codebook_bits", codebook_bits, 16)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
                raise AQLMError(f"method.aqlm.{option}={value!r} must be a whole number in 1..{high}")
        for option, value in (("tolerance", tolerance), ("finetune_lr", finetune_lr)):
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise AQLMError(f"method.aqlm.{option}={value!r} must be a number of at least 0")
        # aqlm_quantize's settings, resolved once and passed down by name
        self.solver = dict(codebooks=codebooks, codebook_bits=codebook_bits, group=group, beam_size=beam_size,
                           rounds=rounds, tolerance=float(tolerance), cg_steps=cg_steps, init_iters=init_iters,
                           seed=seed)  # fmt: skip
        self.finetune_epochs, self.finetune_lr = finetune_epochs, float(finetune_lr)

    def prepare(self, config) -> None:
        """Every linear's input width must hold whole groups; fine-tuning handles dense blocks only."""
        widths = {getattr(config, key, None) for key in ("hidden_size", "intermediate_size")}
        group = self.solver["group"]
        bad = sorted(w for w in widths if isinstance(w, int) and w % group)
        if bad:
            raise AQLMError(f"method.aqlm.group={group} does not divide the model's width {bad[0]}; choose a "
                            "divisor of it (8 in the paper)")  # fmt: skip
        if self.finetune_epochs and getattr(config, "num_local_experts", None):
            raise AQLMError("method.aqlm.finetune_epochs: block fine-tuning supports dense models only; set it to 0")

    def _factor_stage(self, hessians):
        return {}  # AQLM reads H itself: no Cholesky factors

    def solve_weight(self, W: torch.Tensor, H: torch.Tensor, factor: Factor | None, parts=None):
        """Each linear of the stack (``parts``: their rows) gets its own codebooks; they share H."""
        parts = parts or [W.shape[0]]
        results, start = [], 0
        for count in parts:
            results.append(aqlm_quantize(W[start : start + count], H, self.spec, **self.solver))
            start += count
        weights = [r[0] for r in results]
        weight = AQLMWeight(torch.cat([w.codes for w in weights]), torch.cat([w.codebooks for w in weights]),
                            torch.cat([w.scale for w in weights]), self.spec, tuple(parts))  # fmt: skip
        info = {"percdamp": 0.0, "retries": 0, "parts": [r[2] for r in results]}  # each linear reports its own
        return weight, torch.cat([r[1] for r in results]), info

    def quantize_block(self, ctx: BlockContext) -> None:
        targets = ctx.forward(keep_outputs=True) if self.finetune_epochs else None
        super().quantize_block(ctx)
        if targets is not None:
            start = time.perf_counter()
            before, after = finetune_block(ctx, targets, self.finetune_epochs, self.finetune_lr)
            ctx.add_time("finetune_s", time.perf_counter() - start)
            for name in ctx.linears:
                ctx.stats[name].update(finetune_error_before=before, finetune_error_after=after)
            log.info("block %d AQLM fine-tuning: relative output error %.4g -> %.4g", ctx.index + 1, before, after)


def finetune_block(ctx: BlockContext, targets: list[torch.Tensor], epochs: int, lr: float) -> tuple[float, float]:
    """Adam on the block's codebooks and scales (codes fixed) for ``epochs`` passes over the calibration chunks,
    minimizing the block output's squared error relative to the full-precision block's (targets); the best state
    seen (measured at the start of each epoch and at the end) is kept. Returns (relative error before, after)."""
    names = list(ctx.linears)
    weights = {name: ctx.quantized[name] for name in names}
    params = {name: (q.codebooks.detach().clone().requires_grad_(True), q.scale.detach().clone().requires_grad_(True))
              for name, q in weights.items()}  # fmt: skip
    optimizer = torch.optim.Adam([p for pair in params.values() for p in pair], lr=lr)
    frozen = [p for p in ctx.block.parameters() if p.requires_grad]
    dtypes = {name: get_weight(ctx.linears[name]).dtype for name in names}

    def block_weights(grad: bool) -> dict[str, torch.Tensor]:
        out = {}
        with torch.set_grad_enabled(grad):
            for name, q in weights.items():
                books, scale = params[name]
                w = decode(books[0], q.codes.long()).reshape(q.codes.shape[0], -1) * scale
                out[f"{name}.weight"] = w.to(dtypes[name])
        return out

    def epoch(train: bool) -> float:
        total, norm = 0.0, 0.0
        for chunk, target in zip(ctx.chunks(), targets, strict=True):
            hidden = chunk.to(ctx.device)
            kwargs = ctx.inputs.kwargs_for(hidden)
            with torch.set_grad_enabled(train):
                out = torch.func.functional_call(ctx.block, block_weights(train), (hidden,), kwargs)
                out = out[0] if isinstance(out, tuple) else out
                target = target.to(ctx.device)
                err = F.mse_loss(out.float(), target.float(), reduction="sum")
                scale = target.float().square().sum()
                if train:
                    (err / scale).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            total, norm = total + err.item(), norm + scale.item()
        return total / norm

    for p in frozen:
        p.requires_grad_(False)
    try:
        before = best = epoch(train=False)
        kept = {name: (b.detach().clone(), s.detach().clone()) for name, (b, s) in params.items()}
        for _ in range(epochs):
            epoch(train=True)
            with torch.no_grad():
                for books, scale in params.values():  # the values as stored
                    books.copy_(_fp16(books))
                    scale.copy_(_fp16(scale))
            now = epoch(train=False)
            if now < best:
                best = now
                kept = {name: (b.detach().clone(), s.detach().clone()) for name, (b, s) in params.items()}
    finally:
        for p in frozen:
            p.requires_grad_(True)
    for name, (books, scale) in kept.items():
        q = weights[name]
        ctx.set_quantized(name, AQLMWeight(q.codes, books, scale, q.spec, q.part_rows))
    return before, best
