"""SpQR (Dettmers et al., 2023, "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight Compression").

GPTQ's column-by-column solve (ptq/methods/gptq.py) with three changes (the paper's Algorithm 1):

    small groups       each group of ``group_size`` (β1) input columns gets its own scale and zero per output row,
                       fitted when the solve reaches the group, from the updated weights
    quantized stats    those scales and zeros are themselves quantized to ``stat_bits`` in groups of ``stat_group``
                       (β2) rows, with a 16-bit scale and minimum per such group (the second level)
    outliers           a weight whose rounding error, scaled by the inverse Hessian's Cholesky diagonal, exceeds
                       ``outlier_threshold`` times the layer's mean (error scale below) stays in 16 bits, stored as
                       a sparse matrix; the group's statistics are fitted without the weights that a leave-one-out
                       test marks as likely outliers (§4.1, "sensitivity")

The error scale is mean over columns j of Var_rows(W[:, j]) / U_jj², U the upper Cholesky factor of H^-1 (the
reference implementation's normalisation, so ``outlier_threshold`` means what the paper's τ = 0.2 means).
With ``outlier_threshold=None`` and ``stat_bits=None`` this is GPTQ with groups fitted as the solve reaches them
(``static_groups=false``), to the bit (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ptq.methods.gptq import GPTQ, Factor, factor_hessian, group_weights
from ptq.quant import QuantizedWeight, WeightSpec
from ptq.quant.weight import register_weight_kind

SECOND_LEVEL_BITS = 16  # the scale and minimum of each β2 group of statistics, stored in fp16
OUTLIER_BITS = 32  # a 16-bit value and a 16-bit column index per outlier (CSR), as the paper counts them


@register_weight_kind
@dataclass
class SpQRWeight(QuantizedWeight):
    """A SpQR layer: the base grid (codes, dequantized per-group statistics, ``g_idx``), the outliers as flat
    indices into [rows, columns] with their 16-bit values, and how the statistics are stored."""

    outlier_index: torch.Tensor | None = None  # [n] int64, row * columns + column
    outlier_value: torch.Tensor | None = None  # [n] float16
    stat_bits: int | None = None  # None: scales and zeros in 16 bits
    stat_group: int = 16

    def dequantize(self) -> torch.Tensor:
        w = super().dequantize()
        if self.outlier_index is not None and self.outlier_index.numel():
            w.view(-1)[self.outlier_index.to(w.device)] = self.outlier_value.to(w.device, w.dtype)
        return w

    layout = "spqr"

    def rows(self, start: int, stop: int) -> SpQRWeight:
        """Output channels ``start:stop`` with their outliers (one linear of a row-stacked group)."""
        base = super().rows(start, stop)
        columns = self.qweight.shape[1]
        index, value = self.outlier_index, self.outlier_value
        if index is not None:
            inside = (index >= start * columns) & (index < stop * columns)
            index, value = index[inside] - start * columns, value[inside]
        return SpQRWeight(base.qweight, base.scale, base.zero, base.g_idx, base.spec, base.tensor_scale,
                          index, value, self.stat_bits, self.stat_group)  # fmt: skip

    @property
    def outliers(self) -> int:
        return 0 if self.outlier_index is None else int(self.outlier_index.numel())

    def stored_bytes(self) -> int:
        """Codes, first- and second-level statistics, outliers (CSR: value, column, row pointers), permutation."""
        rows, columns = self.qweight.shape
        groups = self.scale.shape[1]
        bits = rows * columns * self.spec.bits
        stats = 1 if self.spec.sym else 2  # scale, and zero for an asymmetric grid
        if self.stat_bits is None:
            bits += rows * groups * stats * 16
        else:
            bits += rows * groups * stats * self.stat_bits
            bits += math.ceil(rows / self.stat_group) * groups * stats * 2 * SECOND_LEVEL_BITS
        bits += self.outliers * OUTLIER_BITS + (rows + 1) * 32
        bits += columns * 32  # g_idx: the act-order permutation's groups
        return math.ceil(bits / 8)


def quantize_stat(values: torch.Tensor, bits: int, group: int, integer: bool = False) -> torch.Tensor:
    """``values`` [rows] rounded to ``bits`` in groups of ``group`` consecutive rows (asymmetric min-max, the
    group's minimum and step in fp16); ``integer``: the result is rounded to whole numbers (zero points)."""
    rows = values.shape[0]
    padded = torch.cat([values, values[-1:].expand((-rows) % group)])  # the last group filled with its last value
    v = padded.view(-1, group)
    low = v.amin(dim=1, keepdim=True).half().float()
    step = ((v.amax(dim=1, keepdim=True) - low) / (2**bits - 1)).half().float()
    step = torch.where(step > 0, step, torch.ones_like(step))  # equal values (zero points often are): any step
    out = (torch.clamp(torch.round((v - low) / step), 0, 2**bits - 1) * step + low).flatten()[:rows]
    return out.round() if integer else out


def leave_one_out_gain(group_w: torch.Tensor, d: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """[rows, g]: how much the group's scaled squared rounding error falls when weight (i, k) is left out of it (kept
    in 16 bits, its statistics fitted on the other g - 1), error scaled by 1/d (d: the U diagonal of the group)."""
    rows, g = group_w.shape
    keep = torch.arange(g, device=group_w.device)
    others = keep[1:] - (keep[:, None] >= keep[1:]).long()  # [g, g - 1]: every column but k, for each k
    loo = group_w[:, others]  # [rows, g, g - 1]
    flat = loo.reshape(rows * g, g - 1)
    s, z = spec.params(flat)
    err = ((spec.dequantize(spec.quantize(flat, s, z), s, z) - flat).view(rows, g, g - 1) / d[others]).square().sum(-1)
    s, z = spec.params(group_w)
    base = ((spec.dequantize(spec.quantize(group_w, s, z), s, z) - group_w) / d).square().sum(-1, keepdim=True)
    return base - err


def spqr_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: WeightSpec,
    block_size: int = 128,
    percdamp: float = 1.0,
    act_order: bool = True,
    stat_bits: int | None = 3,
    stat_group: int = 16,
    outlier_threshold: float | None = 0.2,
    factor: Factor | None = None,
) -> tuple[SpQRWeight, torch.Tensor, dict]:
    """SpQR of a [rows, columns] weight given its input Hessian; returns (weight, per-row loss, solver info).
    H is consumed (overwritten)."""
    work = torch.float64 if W.dtype == torch.float64 else torch.float32
    rows, columns = W.shape
    group = spec.group_size_for(columns)
    factor = factor or factor_hessian(H, percdamp, act_order, work, consume=True)
    U, perm, dead, info = factor.hinv.to(work), factor.perm, factor.dead, dict(factor.info)
    W = W.to(work, copy=True).masked_fill_(dead, 0)
    if perm is not None:
        W = W[:, perm]
    d = torch.diagonal(U)
    threshold = None
    if outlier_threshold is not None:
        threshold = outlier_threshold * (W.var(dim=0) / d.square()).mean()

    num_groups = spec.num_groups(columns)
    scale = torch.zeros(rows, num_groups, dtype=work, device=W.device)
    zero = torch.zeros_like(scale)
    codes = torch.zeros_like(W)
    outlier = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=work, device=W.device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:  # fit this group's statistics on its current (updated) weights
                end = min(col + group, columns)
                current = group_weights(W, W1, Err1, U, i1, i2, col, group)
                if threshold is not None and current.shape[1] > 1:
                    likely = leave_one_out_gain(current, d[col:end], spec) > threshold
                    kept = (~likely).to(work)
                    mean = (current * kept).sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp(min=1)
                    current = torch.where(likely, mean, current)  # fit the grid without the likely outliers
                s, z = spec.params(current)
                if stat_bits is not None:
                    s = quantize_stat(s[:, 0], stat_bits, stat_group)[:, None]
                    if not spec.sym:
                        z = quantize_stat(z[:, 0], stat_bits, stat_group, integer=True)[:, None]
                scale[:, col // group], zero[:, col // group] = s[:, 0], z[:, 0]
            s, z = scale[:, col // group], zero[:, col // group]
            w = W1[:, i]
            c = spec.quantize(w, s, z)
            q = spec.dequantize(c, s, z)
            err = (w - q) / U1[i, i]
            if threshold is not None:
                out = err.square() > threshold  # kept in 16 bits: no rounding error to carry forward
                outlier[:, col] = out
                q = torch.where(out, w, q)
                err = torch.where(out, torch.zeros_like(err), err)
            codes[:, col] = c
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            Err1[:, i] = err
        losses += (Err1**2).sum(dim=1) / 2
        W[:, i1:i2] = W1  # each column as rounded (an outlier: as the solve had updated it, kept in 16 bits)
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)

    g_idx = (torch.arange(columns, device=W.device) // group).to(torch.int32)
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, g_idx, outlier, W = codes[:, inverse], g_idx[inverse], outlier[:, inverse], W[:, inverse]
    index = outlier.flatten().nonzero().flatten()
    qweight = SpQRWeight(
        spec.fmt.encode(codes), scale, zero, g_idx, spec, None,
        outlier_index=index, outlier_value=W.flatten()[index].half(),
        stat_bits=stat_bits, stat_group=stat_group,
    )  # fmt: skip
    info = {**info, "outliers": int(index.numel()), "outlier_fraction": index.numel() / W.numel()}
    return qweight, losses, info


class SpQR(GPTQ):
    """SpQR as a pipeline step: GPTQ's calibration and stages, SpQR's solve. Options (method.spqr.<option>) with
    the reference implementation's defaults for LLaMA; β1 is the run's ``group_size`` (the paper: 16)."""

    name = "spqr"
    label = "SpQR"
    splits_rows = False  # the outlier scale and the second-level groups span all rows: every rank solves whole groups

    def __init__(
        self,
        spec: WeightSpec,
        stat_bits: int | None = 3,
        stat_group: int = 16,
        outlier_threshold: float | None = 0.2,
        percdamp: float = 1.0,
        act_order: bool = True,
        block_size: int = 128,
        true_sequential: bool = True,
        hessian: str = "auto",
    ) -> None:
        super().__init__(spec, block_size, percdamp, act_order, static_groups=False,
                         true_sequential=true_sequential, hessian=hessian, loop="torch")  # fmt: skip
        if spec is not None and not (spec.is_int and not spec.per_tensor):
            raise ValueError("method=spqr quantizes to integer grids in groups: use format=int with a group_size")
        if stat_bits is not None and (not isinstance(stat_bits, int) or not 2 <= stat_bits <= 8):
            raise ValueError(f"spqr.stat_bits={stat_bits!r} must be 2..8, or null for 16-bit statistics")
        if not isinstance(stat_group, int) or stat_group < 1:
            raise ValueError(f"spqr.stat_group={stat_group!r} must be a whole number of rows (default 16)")
        if outlier_threshold is not None and not (isinstance(outlier_threshold, int | float) and outlier_threshold > 0):
            raise ValueError(f"spqr.outlier_threshold={outlier_threshold!r} must be positive, or null for no outliers")
        self.stat_bits, self.stat_group = stat_bits, stat_group
        self.outlier_threshold = None if outlier_threshold is None else float(outlier_threshold)

    def solve_weight(self, W: torch.Tensor, H: torch.Tensor, factor: Factor | None, parts=None):
        return spqr_quantize(
            W, H, self.spec, self.block_size, self.percdamp, self.act_order, self.stat_bits, self.stat_group,
            self.outlier_threshold, factor,
        )  # fmt: skip
