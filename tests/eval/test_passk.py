"""pass@k: hand-worked values, the binomial definition, and bad k."""

from __future__ import annotations

from math import comb

import pytest

from lmforge.errors import UserError
from lmforge.eval.passk import mean_pass_at_k, pass_at_k


def test_hand_worked_values() -> None:
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the pass fraction
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(4, 2, 3) == 1.0  # any 3 of 4 include a pass: n - c < k


@pytest.mark.parametrize("n", [1, 5, 20, 100])
def test_equals_the_binomial_definition(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            exact = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_mean_over_tasks_and_bad_k() -> None:
    got = mean_pass_at_k([(2, 1), (2, 0), (2, 2)], [1, 2])
    assert got["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert got["pass@2"] == pytest.approx((1 + 0 + 1) / 3)
    with pytest.raises(UserError, match="k=5 is larger than n=2"):
        pass_at_k(2, 1, 5)
    with pytest.raises(UserError, match="k must be >= 1"):
        pass_at_k(2, 1, 0)
