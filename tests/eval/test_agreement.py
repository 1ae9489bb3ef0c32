"""Agreement, win-rate intervals and Bradley-Terry against hand-worked and published values."""

from __future__ import annotations

import math

import pytest

from lmforge.errors import UserError
from lmforge.eval.agreement import (
    bradley_terry,
    cohen_kappa,
    elo_ratings,
    fleiss_kappa,
    position_bias,
    wilson,
    win_rate,
)

EPS = 1e-12  # a few float64 roundings of numbers below 10


def test_cohen_kappa_of_the_worked_example() -> None:
    """50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15: p_o 0.7, p_e 0.5, kappa 0.4."""
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=EPS)
    assert cohen_kappa(a, a) == pytest.approx(1.0, abs=EPS)
    assert math.isnan(cohen_kappa(["x"] * 3, ["x"] * 3))  # chance explains it all
    with pytest.raises(UserError, match="3 labels against 2"):
        cohen_kappa([1, 2, 3], [1, 2])


# Fleiss (1971), as worked on Wikipedia: 10 items, 14 annotators, 5 categories
FLEISS = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
          [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def test_fleiss_kappa_of_the_published_example() -> None:
    """Published to three decimals (0.210): held to half of its last digit."""
    assert fleiss_kappa(FLEISS) == pytest.approx(0.210, abs=5e-4)
    # two annotators: Fleiss' kappa is Scott's pi, which here equals Cohen's kappa (the two
    # annotators' label frequencies agree: 2 yes and 2 no each)
    a, b = ["y", "y", "n", "n"], ["y", "n", "y", "n"]
    rows = [[(x == "y") + (y == "y"), (x == "n") + (y == "n")] for x, y in zip(a, b)]
    assert fleiss_kappa(rows) == pytest.approx(cohen_kappa(a, b), abs=EPS)
    with pytest.raises(UserError, match="same number"):
        fleiss_kappa([[1, 1], [2, 1]])


def test_wilson_interval_of_published_values() -> None:
    """8 of 10: (0.4902, 0.9433); 0 of 10: (0, 0.2775), four decimals as published."""
    lo, hi = wilson(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=5e-5), pytest.approx(0.9433, abs=5e-5))
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=5e-5)
    with pytest.raises(UserError, match="11 successes out of 10"):
        wilson(11, 10)


def test_win_rate_counts_a_tie_as_half_a_win() -> None:
    w = win_rate(wins=6, losses=2, ties=2)
    assert (w.wins, w.games, w.rate) == (7.0, 10, 0.7)
    assert (w.low, w.high) == wilson(7.0, 10)
    assert w.low < 0.7 < w.high
    assert position_bias(first_won=6, second_won=4) == pytest.approx(0.6, abs=EPS)
    assert math.isnan(position_bias(0, 0))


def test_bradley_terry_of_two_models_is_their_odds() -> None:
    """A beat B 3 times, B beat A once: p_A / p_B = 3; normalized to a geometric mean of 1,
    p_A = sqrt 3, p_B = 1/sqrt 3; on the Elo scale the gap is 400 log10 3 = 190.85."""
    p = bradley_terry({("A", "B"): 3, ("B", "A"): 1})
    assert p["A"] == pytest.approx(math.sqrt(3), abs=1e-9)
    assert p["B"] == pytest.approx(1 / math.sqrt(3), abs=1e-9)
    elo = elo_ratings(p)
    assert elo["A"] - elo["B"] == pytest.approx(400 * math.log10(3), abs=1e-6)


def test_bradley_terry_meets_its_likelihood_equations() -> None:
    """A small tournament of four models with a tie: at the maximum each model's wins equal
    its expected wins, W_i = sum_j n_ij p_i / (p_i + p_j); a cycle of equal records gives
    equal strengths."""
    wins = {("A", "B"): 7, ("B", "A"): 3, ("A", "C"): 6, ("C", "A"): 4, ("B", "C"): 5.5,
            ("C", "B"): 4.5, ("A", "D"): 9, ("D", "A"): 1, ("C", "D"): 6, ("D", "C"): 2}
    p = bradley_terry(wins)
    for i in p:
        won = sum(w for (x, _), w in wins.items() if x == i)
        expected = sum(w * p[i] / (p[i] + p[y if x == i else x])
                       for (x, y), w in wins.items() if i in (x, y))
        assert expected == pytest.approx(won, abs=1e-8)
    assert p["A"] > p["B"] > p["C"] > p["D"]
    cycle = bradley_terry({("A", "B"): 2, ("B", "A"): 1, ("B", "C"): 2, ("C", "B"): 1,
                           ("C", "A"): 2, ("A", "C"): 1})
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in cycle.values())


def test_a_model_that_never_won_has_no_strength() -> None:
    with pytest.raises(UserError, match="C never won"):
        bradley_terry({("A", "B"): 2, ("B", "A"): 1, ("A", "C"): 1, ("B", "C"): 1})
    with pytest.raises(UserError, match="A never lost"):
        bradley_terry({("A", "B"): 3})
