"""pass@k with the unbiased estimator of Chen et al. 2021 (the Codex paper).

From n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that at least
one of k samples drawn without replacement from the n passes. The product form below avoids
the huge binomials: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lmforge.errors import UserError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Examples: n=2, c=1, k=1 -> 0.5; n=5, c=2, k=2 -> 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    check_k(k, n)
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def check_k(k: int, n: int) -> None:
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    if k > n:
        raise UserError(f"k={k} is larger than n={n} samples per task: pass@k needs n >= k")


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """{"pass@k": mean over tasks} from per-task (n, c)."""
    if not counts:
        return {f"pass@{k}": 0.0 for k in ks}
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks}
