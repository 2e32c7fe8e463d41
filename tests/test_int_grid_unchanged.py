"""The integer grid is bit for bit what it was before number formats existed.

``tests/data/int_grid_before_formats.json`` holds digests of codes, scales, zero points and
fake-quantized weights (RTN for 2-8 bits, per channel and in groups, symmetric and asymmetric) and of
GPTQ's codes (float64, reference and activation order), computed with ptq at commit 8cd8678, the last
one before the format layer. The same computation with today's code must give the same bytes.
End to end, the stories260K offline grid (RTN, GPTQ in the reference order, AWQ at 4 and 3 bits) gave
identical perplexities and per-layer statistics with both versions on the same machine (README).
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from ptq.methods.gptq import gptq_quantize
from ptq.quant import WeightSpec, fake_quantize_weight, quantize_weight

GOLDEN = json.loads((Path(__file__).parent / "data" / "int_grid_before_formats.json").read_text())


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 300, generator=g) * torch.logspace(-2, 1, 300)  # columns of very different ranges
    w[3] = 0  # an all-zero row
    x = torch.randn(512, 300, generator=g) @ torch.randn(300, 300, generator=g) / 10
    return w, (2 / 512 * x.T @ x).double()


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [-1, 32, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_grid_is_unchanged(problem, bits, group, sym):
    w, H = problem
    spec = WeightSpec("int", bits, group, sym)
    qw = quantize_weight(w, spec)
    key = f"{bits}-{group}-{sym}"
    assert [digest(qw.qweight, qw.scale, qw.zero, qw.g_idx), digest(fake_quantize_weight(w, spec))] == GOLDEN[key]
    if group != -1 and bits in (3, 4):
        for act_order, static in ((False, False), (True, True)):
            gq = gptq_quantize(w.double(), H, spec, act_order=act_order, static_groups=static)[0]
            assert digest(gq.qweight, gq.g_idx) == GOLDEN[f"gptq-{key}-{act_order}"]
