"""How far human (or model) preference labels can be trusted, and what they say about the
models compared: agreement between annotators (Cohen's kappa for two, Fleiss' kappa for more),
win rates with Wilson score intervals, position bias, and Bradley-Terry strengths (with their
Elo-scale ratings) when more than two models meet.

Pure functions on counts and label lists; the annotation app (issue: runs dashboard and
human preferences) and the LLM judge's reports call them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from lmforge.errors import UserError


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Agreement of two annotators on the same items beyond what chance gives:
    (p_o - p_e) / (1 - p_e), with p_o the share of items they label alike and p_e the share
    two annotators labelling at random with their own label frequencies would.

    Worked (Wikipedia's example): 50 items, yes/yes 20, yes/no 5, no/yes 10, no/no 15:
    p_o = 35/50 = 0.7, p_e = 25/50 x 30/50 + 25/50 x 20/50 = 0.5, kappa = 0.2 / 0.5 = 0.4."""
    if len(a) != len(b):
        raise UserError(f"cohen_kappa: {len(a)} labels against {len(b)}; label the same items")
    n = len(a)
    if n == 0:
        raise UserError("cohen_kappa: no items labelled by both annotators")
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if p_e == 1.0:  # both gave one and the same label to everything: agreement is undefined
        return float("nan")
    return (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Agreement of several annotators: `counts[i][k]` annotators put item i in category k,
    the same number of annotators m for every item. P_i = (sum_k n_ik^2 - m) / (m (m - 1)),
    P-bar their mean, P_e = sum_k p_k^2 with p_k category k's share of all labels;
    kappa = (P-bar - P_e) / (1 - P_e).

    Worked (Fleiss 1971 as on Wikipedia: 10 items, 14 annotators, 5 categories):
    P-bar = 0.378, P_e = 0.213, kappa = 0.210."""
    if not counts:
        raise UserError("fleiss_kappa: no items")
    m = sum(counts[0])
    if m < 2 or any(sum(row) != m for row in counts):
        raise UserError("fleiss_kappa: every item needs the same number (>= 2) of annotators")
    n, k = len(counts), len(counts[0])
    p_bar = sum((sum(x * x for x in row) - m) / (m * (m - 1)) for row in counts) / n
    shares = [sum(row[j] for row in counts) / (n * m) for j in range(k)]
    p_e = sum(p * p for p in shares)
    if p_e == 1.0:
        return float("nan")
    return (p_bar - p_e) / (1.0 - p_e)


def wilson(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 or n successes.
    center = (p + z^2/2n) / (1 + z^2/n), half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).

    Worked: 8 of 10 gives (0.4902, 0.9433); 0 of 10 gives (0, 0.2775). A tie may count as
    half a win, so `successes` may be fractional."""
    if n <= 0:
        raise UserError("wilson: no trials")
    if not 0 <= successes <= n:
        raise UserError(f"wilson: {successes} successes out of {n} trials")
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class WinRate:
    wins: float  # a tie counts half
    games: int
    low: float
    high: float

    @property
    def rate(self) -> float:
        return self.wins / self.games


def win_rate(wins: int, losses: int, ties: int = 0) -> WinRate:
    """A model's win rate over decided and tied comparisons (a tie: half a win), with its
    Wilson interval."""
    games = wins + losses + ties
    score = wins + 0.5 * ties
    low, high = wilson(score, games)
    return WinRate(score, games, low, high)


def position_bias(first_won: int, second_won: int) -> float:
    """How often the answer shown first (left) wins among the decided comparisons: 0.5 is no
    bias when the order is randomized."""
    decided = first_won + second_won
    if decided == 0:
        return float("nan")
    return first_won / decided


def bradley_terry(wins: dict[tuple[str, str], float], iters: int = 10_000,
                  tol: float = 1e-12) -> dict[str, float]:
    """Bradley-Terry strengths p (P(i beats j) = p_i / (p_i + p_j)) by maximum likelihood,
    with Hunter's (2004) MM iteration p_i <- W_i / sum_j n_ij / (p_i + p_j), normalized to a
    geometric mean of 1. `wins[(i, j)]` is how often i beat j (a tie: half to each).

    At the optimum each model's wins equal its expected wins, W_i = sum_j n_ij p_i/(p_i+p_j)
    (the likelihood's first-order condition, which the tests check). A model that never won,
    or never lost, has no finite strength: refused with the name."""
    names = sorted({x for pair in wins for x in pair})
    games: Counter[frozenset[str]] = Counter()
    won: Counter[str] = Counter()
    for (i, j), w in wins.items():
        if i == j:
            raise UserError(f"bradley_terry: {i} against itself")
        games[frozenset((i, j))] += w
        won[i] += w
    for x in names:
        played = sum(n for pair, n in games.items() if x in pair)
        if won[x] == 0 or won[x] == played:
            raise UserError(f"bradley_terry: {x} {'never won' if won[x] == 0 else 'never lost'}; "
                            "its strength has no finite estimate (collect more comparisons)")
    p = dict.fromkeys(names, 1.0)
    for _ in range(iters):
        new = {}
        for i in names:
            denom = sum(n / (p[i] + p[j]) for pair, n in games.items() if i in pair
                        for j in pair - {i})
            new[i] = won[i] / denom
        scale = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        new = {k: v / scale for k, v in new.items()}
        done = max(abs(new[k] - p[k]) for k in names) < tol
        p = new
        if done:
            break
    return p


def elo_ratings(strengths: dict[str, float], base: float = 1000.0) -> dict[str, float]:
    """Bradley-Terry strengths on the Elo scale: 400 log10(p) + base, so a 400-point gap is
    10:1 odds (the scale Chatbot Arena reports its Bradley-Terry fit on)."""
    return {k: base + 400.0 * math.log10(v) for k, v in strengths.items()}
