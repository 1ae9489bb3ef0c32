"""pass@k with the unbiased estimator of Chen et al. 2021 (the Codex paper).

From n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that at least
one of k samples drawn without replacement from the n passes. The product form below avoids
the huge binomials: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
"""

from __future__ import annotations

import math
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


def best_of_k(scores: Sequence[float], passed: Sequence[bool], k: int) -> float:
    """The chance that the highest-scoring of k answers drawn without replacement from the n
    passes: the best-of-k (rejection sampling) pass@1 of a selector that scores answers.

    Rank the n answers by score (ties: the earlier answer first); answer i at rank p_i (0 is
    the best) is the pick of a k-subset exactly when the other k - 1 come from the n - 1 - p_i
    ranked below it, so P = sum over passing i of C(n - 1 - p_i, k - 1) / C(n, k). With the
    tests as the score (1 pass, 0 fail) this is pass@k; with a reward model it is how often
    its pick passes, unbiased over subsets, without drawing any.

    Worked example: scores [0.9, 0.5, 0.7, 0.1], passed [F, T, T, F], k = 2: ranks 0, 2, 1, 3;
    the passing answers give C(1, 1) + C(2, 1) = 3 of C(4, 2) = 6 subsets: 0.5 (enumerating
    the six pairs agrees); k = 1 gives the pass rate 0.5, k = 4 gives 0 (answer 0 wins).
    """
    n = len(scores)
    if len(passed) != n:
        raise ValueError(f"{n} scores but {len(passed)} pass flags")
    check_k(k, n)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    total = math.comb(n, k)
    return sum(math.comb(n - 1 - p, k - 1) for p, i in enumerate(order) if passed[i]) / total
