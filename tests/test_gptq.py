import pytest
import torch

import ptq
from ptq.methods.gptq import gptq_quantize
from ptq.models import block_linears, get_blocks, get_weight
from ptq.quant import WeightSpec, quantize_weight
from tests.conftest import tiny_model


def correlated_inputs(n_tokens: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    scales = torch.rand(dim, generator=g) * 3 + 0.1
    return (torch.randn(n_tokens, dim, generator=g) @ mix) * scales


def reference_gptq(W, H, spec, percdamp, act_order, static_groups):
    """The paper's update rule, column by column, in float64, with no lazy blocks.

    For each column j: round it, then W[:, j:] -= (w_j - q_j) / U[j, j] * U[j, j:], where U is the
    upper Cholesky factor of (H + damp I)^-1. A group's scale is taken when its first column is
    reached, from the group's weights as they are at that moment.
    """
    W, H = W.double().clone(), H.double().clone()
    columns = W.shape[1]
    g = spec.group_size_for(columns)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(columns)
    static = [spec.params(W[:, s : s + g]) for s in range(0, columns, g)]
    W, H = W[:, order], H[order][:, order]
    H += percdamp * torch.diagonal(H).mean() * torch.eye(columns, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    for j in range(columns):
        if static_groups:
            scale, zero = static[int(order[j]) // g]
        elif j % g == 0:
            scale, zero = spec.params(W[:, j : j + g])
        q = torch.clamp(torch.round(W[:, j : j + 1] / scale) + zero, 0, spec.maxq)
        Q[:, j] = (scale * (q - zero))[:, 0]
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    return Q[:, torch.argsort(order)]


CASES = [
    # (group_size, act_order, static_groups)
    (-1, False, False),
    (16, False, False),
    (16, True, False),
    (16, True, True),
    (24, False, False),  # 72 columns: groups of 24 that straddle blocks of 7 and 128
    (24, True, False),
]


def _solve_both(group, act_order, static_groups, sym, block_size):
    torch.manual_seed(0)
    columns = 72
    X = correlated_inputs(400, columns, seed=1).double()
    H = 2 / X.shape[0] * X.T @ X
    H[5, :] = H[:, 5] = 0  # a dead input
    W = torch.randn(20, columns, dtype=torch.float64)
    spec = WeightSpec("int", 3, group, sym)
    want = reference_gptq(W, H, spec, 0.01, act_order, static_groups)
    qweight, _, _ = gptq_quantize(W, H, spec, block_size, 0.01, act_order, static_groups)
    return qweight, want, W


@pytest.mark.parametrize("group,act_order,static_groups", CASES)
@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_blocked_solver_equals_unblocked_reference(group, act_order, static_groups, block_size):
    qweight, want, _ = _solve_both(group, act_order, static_groups, False, block_size)
    got = qweight.dequantize()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert torch.all(got[:, 5] == 0)  # the dead input's weights are zeroed


@pytest.mark.parametrize("group,act_order,static_groups", CASES)
@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_blocked_solver_equals_unblocked_reference_symmetric(group, act_order, static_groups, block_size):
    """The symmetric grid maps -max|x| of a group exactly onto the rounding tie between its two
    lowest codes (x / scale = -(2^bits - 1) / 2), so float summation order (blocked vs unblocked)
    may pick either code (same error), and a flip then propagates along that row. Exact equality
    is therefore impossible by construction; require near-total agreement and the same error."""
    qweight, want, W = _solve_both(group, act_order, static_groups, True, block_size)
    got = qweight.dequantize()
    assert ((got - want).abs() > 1e-9).double().mean() < 0.05
    X = correlated_inputs(400, 72, seed=1).double()
    err_got = ((X @ (W - got).T) ** 2).sum()
    err_want = ((X @ (W - want).T) ** 2).sum()
    assert abs(err_got / err_want - 1) < 0.02


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
def test_every_weight_lies_on_its_group_grid(act_order, static_groups):
    torch.manual_seed(2)
    X = correlated_inputs(300, 64, seed=3)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(16, 64)
    spec = WeightSpec("int", 4, 16, False)
    qw, _, _ = gptq_quantize(W, H, spec, 128, 0.01, act_order, static_groups)
    assert qw.g_idx.shape == (64,) and qw.g_idx.dtype == torch.int32
    # each group holds exactly group_size columns, and each column's value is scale*(q - zero) of its group
    assert torch.bincount(qw.g_idx.long()).tolist() == [16] * 4
    if not act_order or static_groups:
        assert torch.equal(qw.g_idx.long(), torch.arange(64) // 16)
    for j in range(64):
        gidx = qw.g_idx[j]
        expected = qw.scale[:, gidx] * (qw.qweight[:, j].float() - qw.zero[:, gidx])
        assert torch.equal(qw.dequantize()[:, j], expected)
    assert qw.qweight.max() <= spec.maxq


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_output_error_is_below_rtn_on_correlated_inputs(bits):
    torch.manual_seed(4)
    X = correlated_inputs(2048, 128, seed=5)
    W = torch.randn(64, 128)
    H = 2 / X.shape[0] * X.T @ X
    spec = WeightSpec("int", bits, 32, False)
    gptq_w = gptq_quantize(W, H, spec)[0].dequantize()
    rtn_w = quantize_weight(W, spec).dequantize()
    err_gptq = ((X @ (W - gptq_w).T) ** 2).sum()
    err_rtn = ((X @ (W - rtn_w).T) ** 2).sum()
    assert err_gptq < 0.8 * err_rtn


def test_non_positive_definite_hessian_is_retried_with_more_damping():
    H = -torch.eye(8)  # negative definite: plain damping at 1% cannot fix it
    H[0, 0] = 100.0
    qw, _, info = gptq_quantize(torch.randn(4, 8), H, WeightSpec("int", 4, -1, False))
    assert info["retries"] > 0 and info["percdamp"] > 0.01
    assert torch.isfinite(qw.dequantize()).all()


def _gptq_model(seed_data=0, **options):
    model = tiny_model("llama")
    calib = torch.randint(0, 96, (6, 32), generator=torch.Generator().manual_seed(seed_data))
    report = ptq.quantize(
        model,
        method="gptq",
        bits=3,
        group_size=16,
        calib=calib,
        device="cpu",
        batch_size=4,
        options={"gptq": options} if options else None,
    )
    return model, report


def test_same_seed_same_result_and_losses_are_recorded():
    a, report = _gptq_model()
    b, _ = _gptq_model()
    for block_a, block_b in zip(get_blocks(a), get_blocks(b), strict=True):
        for (name, la), lb in zip(block_linears(a, block_a).items(), block_linears(b, block_b).values(), strict=True):
            assert torch.equal(get_weight(la), get_weight(lb)), name
    layers = report["blocks"][0]["layers"]
    assert set(layers) == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    assert all(v["loss"] > 0 for v in layers.values())


def test_gptq_through_the_pipeline_beats_rtn_on_the_model_output():
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    held_out = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(2))
    reference = tiny_model("llama")(held_out).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_model("llama")
        ptq.quantize(model, method=method, bits=3, group_size=16, calib=calib, device="cpu")
        errors[method] = ((model(held_out).logits - reference) ** 2).mean().item()
    assert errors["gptq"] < errors["rtn"]


def test_true_sequential_changes_what_later_layers_see():
    a, _ = _gptq_model(true_sequential=True)
    b, _ = _gptq_model(true_sequential=False)
    down_a = get_weight(block_linears(a, get_blocks(a)[0])["mlp.down_proj"])
    down_b = get_weight(block_linears(b, get_blocks(b)[0])["mlp.down_proj"])
    assert not torch.equal(down_a, down_b)


@pytest.mark.parametrize("options,message", [({"percdamp": 0}, "percdamp"), ({"block_size": 0}, "block_size")])
def test_bad_gptq_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        _gptq_model(**options)


def test_consumed_hessian_is_released_and_results_are_unchanged():
    X = correlated_inputs(512, 64, seed=4)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    spec = WeightSpec("int", 4, 32, False)
    kept = gptq_quantize(W, H, spec)[0]
    H_given, W_given = H.clone(), W.clone()
    consumed = gptq_quantize(W_given, H_given, spec, consume=True)[0]
    assert H_given.untyped_storage().size() == 0  # the caller's Hessian no longer holds memory
    assert torch.equal(consumed.qweight, kept.qweight) and torch.equal(consumed.scale, kept.scale)
    assert H.untyped_storage().size() > 0  # without consume nothing of the caller's is touched


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("static_groups", [False, True])
def test_batched_factorizations_give_the_one_by_one_result(act_order, static_groups):
    """A MoE stage factors its experts' Hessians in one stack (factor_hessians): the same codes and losses
    as factoring each alone, dead inputs included."""
    from ptq.methods.gptq import factor_hessians, gptq_quantize
    from ptq.quant import WeightSpec

    torch.manual_seed(0)
    spec = WeightSpec("int", 4, 16, False)
    weights, hessians = [], []
    for _ in range(5):
        x = torch.randn(200, 64)
        x[:, 3] = 0  # an input that is always zero
        weights.append(torch.randn(24, 64))
        hessians.append(2 / 200 * x.T @ x)
    factors = factor_hessians([h.clone() for h in hessians], 0.01, act_order)
    for w, h, factor in zip(weights, hessians, factors, strict=True):
        q1, loss1, info1 = gptq_quantize(w, h, spec, 128, 0.01, act_order, static_groups)
        q2, loss2, info2 = gptq_quantize(w, torch.empty(0), spec, 128, 0.01, act_order, static_groups, factor=factor)
        assert torch.equal(q1.qweight, q2.qweight) and torch.equal(q1.g_idx, q2.g_idx)
        assert torch.allclose(loss1, loss2) and info1 == info2


@pytest.mark.parametrize("n,leaf", [(1, 4), (7, 4), (100, 8), (129, 1024)])
def test_triangular_inverse_by_halves_inverts(n, leaf):
    from ptq.methods.gptq import invert_lower_triangular

    g = torch.Generator().manual_seed(n)
    L = torch.tril(torch.randn(3, n, n, generator=g, dtype=torch.float64)) / n**0.5
    L.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(3, n, generator=g, dtype=torch.float64) + 0.5)
    inverse = invert_lower_triangular(L, leaf=leaf)
    assert torch.equal(inverse, torch.tril(inverse))  # exactly lower-triangular
    torch.testing.assert_close(inverse @ L, torch.eye(n, dtype=torch.float64).expand(3, n, n), rtol=0, atol=1e-10)


def test_inverse_factor_equals_the_cholesky_factor_of_the_inverse():
    """GPTQ's U (upper, U^T U = (H + damp I)^-1) from one factorization of the reversed H equals the
    factor of the explicit inverse, which is how the reference computes it."""
    from ptq.methods.gptq import inverse_hessian_cholesky

    X = correlated_inputs(600, 300, seed=7).double()
    H = 2 / X.shape[0] * X.T @ X
    damped = H + 0.01 * torch.diagonal(H).mean() * torch.eye(300, dtype=H.dtype)
    want = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    U, info = inverse_hessian_cholesky(H.clone(), 0.01)
    assert info == {"percdamp": 0.01, "retries": 0}
    torch.testing.assert_close(U, want, rtol=1e-9, atol=1e-12)


def test_a_non_finite_inverse_is_retried_from_the_rebuilt_hessian(monkeypatch):
    """Should the triangular inverse overflow, the damped J H J is rebuilt from its factor (its memory was
    released) and factored again with more damping: the result is then exactly a 10x-damped factor."""
    from ptq.methods import gptq

    X = correlated_inputs(300, 40, seed=8).double()
    H = 2 / X.shape[0] * X.T @ X
    real, calls = gptq.invert_lower_triangular, []

    def overflow_once(L, leaf=gptq.TRIANGULAR_LEAF):
        calls.append(L.shape)
        return real(L, leaf) * (float("inf") if len(calls) == 1 else 1)

    monkeypatch.setattr(gptq, "invert_lower_triangular", overflow_once)
    U, info = gptq.inverse_hessian_cholesky(H.clone(), 0.01)
    assert info == {"percdamp": 0.1, "retries": 1} and len(calls) == 2
    damped = H + 0.1 * torch.diagonal(H).mean() * torch.eye(40, dtype=H.dtype)
    torch.testing.assert_close(U, torch.linalg.cholesky(torch.linalg.inv(damped), upper=True), rtol=1e-9, atol=1e-12)
