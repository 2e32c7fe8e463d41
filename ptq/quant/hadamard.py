"""Orthogonal transforms for rotating weights and activations (QuaRot, Ashkboos et al. 2024, Sec. 4).

A ``Rotation`` of size n multiplies row vectors by an orthogonal matrix Q = diag(s) (A ⊗ H_{2^k}) where
H_{2^k} is the normalized Walsh–Hadamard matrix (applied with the fast transform, k passes of sums and
differences), A an m x m orthogonal factor for the rest of n = m * 2^k, and s an optional random ±1
vector ("random Hadamard"). QuaRot's sizes that are not powers of two (1536 = 12 * 2^7, 14336 = 28 * 2^9)
take a Hadamard matrix of order m for A, built here by Paley's constructions from a prime q:

- Paley I, q ≡ 3 (mod 4): order q + 1 (12, 20, 24, 44, 224, ...);
- Paley II, q ≡ 1 (mod 4): order 2(q + 1) (28 from q = 13, 36 from q = 17, ...).

Sizes whose odd part no Paley order covers (172 = 4 * 43, 11008 = 256 * 43) get a seeded random orthogonal
m x m factor (QR of a Gaussian matrix) instead: still orthogonal, still cheap (an m x m product per
2^k-block), but not a Hadamard matrix; ``Rotation.kind`` says which one was built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_PALEY_ORDER = 256  # larger Paley factors would make the online m x m product costly


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H_n / sqrt(n) along the last dimension (n a power of two), by the fast transform."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the fast Walsh-Hadamard transform needs a power of two, not {n}")
    shape = x.shape
    h = 1
    while h < n:
        pairs = x.reshape(-1, n // (2 * h), 2, h)
        x = torch.stack([pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]], dim=2)
        h *= 2
    return x.reshape(shape) / math.sqrt(n)


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(q), chi the quadratic character (0 on the diagonal)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if d in residues else -1 for d in range(1, q)], dtype=torch.float64)
    index = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[index]


def paley_hadamard(order: int) -> torch.Tensor | None:
    """A Hadamard matrix (entries ±1, H H^T = order * I) of this order by Paley I or II, or None."""
    q = order - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: H = I + S, S the skew core [[0, 1^T], [-1, Q]]
        core = torch.zeros(order, order, dtype=torch.float64)
        core[0, 1:], core[1:, 0] = 1, -1
        core[1:, 1:] = _jacobsthal(q)
        return torch.eye(order, dtype=torch.float64) + core
    q = order // 2 - 1
    if order % 2 == 0 and q % 4 == 1 and _is_prime(q):  # Paley II: the symmetric core C, entries -> 2x2 blocks
        core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        core[0, 1:], core[1:, 0] = 1, 1
        core[1:, 1:] = _jacobsthal(q)
        plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)  # for entries 0
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)  # for entries ±1
        blocks = torch.where((core == 0)[:, :, None, None], plus, core[:, :, None, None] * one)
        return blocks.permute(0, 2, 1, 3).reshape(order, order)
    return None


def _factor(n: int) -> tuple[int, int]:
    """n = m * 2^k with m the smallest factor that has a Paley Hadamard matrix (m = 1 for powers of two);
    without one, m is n's odd part."""
    power = n & -n
    for k in range(power.bit_length() - 1, -1, -1):
        m = n >> k
        if m == 1 or (m <= MAX_PALEY_ORDER and paley_hadamard(m) is not None):
            return m, 1 << k
    return n // power, power


@dataclass
class Rotation:
    """x -> x @ Q for row vectors x [..., n], Q orthogonal (see the module docstring)."""

    n: int
    small: torch.Tensor | None  # the m x m orthogonal factor A (None when n is a power of two)
    signs: torch.Tensor | None  # the ±1 vector s of a random Hadamard, or None
    kind: str  # "hadamard" or "hadamard x random orthogonal"

    @classmethod
    def build(cls, n: int, seed: int | None = None) -> Rotation:
        """Q for size n; with ``seed`` a random Hadamard (random signs; a random factor where needed)."""
        m, _ = _factor(n)
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        small, kind = None, "hadamard"
        if m > 1:
            paley = paley_hadamard(m)
            if paley is not None:
                small = paley / math.sqrt(m)
            else:
                small, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
                kind = "hadamard x random orthogonal"
        signs = None
        if seed is not None:
            signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return cls(n, None if small is None else small.float(), None if signs is None else signs.float(), kind)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Q in fp32 (then x's dtype): x * s, then (A ⊗ H) over the last dimension."""
        if x.shape[-1] != self.n:
            raise ValueError(f"a rotation of size {self.n} cannot act on {x.shape[-1]} features")
        dtype = x.dtype
        y = x.float()
        if self.signs is not None:
            y = y * self.signs.to(y.device)
        if self.small is None:
            return walsh_hadamard(y).to(dtype)
        m = self.small.shape[0]
        blocks = walsh_hadamard(y.reshape(*y.shape[:-1], m, self.n // m))  # [..., m, 2^k] @ H on the right
        # (x @ (A ⊗ H)) viewed as [m, 2^k] is A^T X H: the m x m factor acts across the blocks.
        y = torch.matmul(self.small.t().to(y.device), blocks)
        return y.reshape(x.shape).to(dtype)

    def matrix(self) -> torch.Tensor:
        """Q itself, [n, n] fp32 (for tests and small fused products)."""
        return self.apply(torch.eye(self.n))

    def to_dict(self) -> dict:
        return {"size": self.n, "kind": self.kind, "small_factor": None if self.small is None else self.small.shape[0]}
