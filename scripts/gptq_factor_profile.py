"""Time GPTQ's factorization at the Llama-3 widths (4096: 8B q/k/v/o/gate/up; 14336: 8B down_proj;
28672: 70B down_proj) on one GPU: the Cholesky factor, the triangular inverse by halves at several leaf
sizes (the last column is one triangular solve against the identity), and ``factor_hessian`` whole.

    python scripts/gptq_factor_profile.py        # prints one line per width (milliseconds, medians of 3)
"""

import time

import torch

from ptq.methods.gptq import factor_hessian, invert_lower_triangular


def median_ms(fn, repeat: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def profile_width(n: int, device: torch.device) -> dict:
    x = torch.randn(8192, n, device=device, dtype=torch.bfloat16)
    H = torch.mm(x.t(), x, out_dtype=torch.float32) * (2 / 8192)
    H.diagonal().add_(0.01 * H.diagonal().mean())
    L = torch.linalg.cholesky(H)
    row = {"cholesky": median_ms(lambda: torch.linalg.cholesky_ex(H))}
    for leaf in (512, 1024, 2048, 4096, n):
        if leaf <= n:
            row[f"tri_inv_leaf{leaf}"] = median_ms(lambda leaf=leaf: invert_lower_triangular(L, leaf))
    ref = torch.linalg.solve_triangular(L, torch.eye(n, device=device), upper=False)
    got = invert_lower_triangular(L)
    row["max_rel_diff_vs_trsm"] = ((got - ref).abs().max() / ref.abs().max()).item()
    row["factor_hessian_new"] = median_ms(lambda: factor_hessian(H, 0.01, True, torch.float32, consume=False))
    return row


def main() -> None:
    for n in (4096, 14336, 28672):
        row = profile_width(n, torch.device("cuda"))
        print(n, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
