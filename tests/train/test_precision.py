"""`precision: auto`: what it picks follows from what it measured or read, and it says why."""

from __future__ import annotations

import pytest
import torch

from lmforge.train import precision as P


def test_explicit_choices_are_kept() -> None:
    for name in ("fp32", "bf16", "fp16"):
        p = P.make_precision(name, "cpu")
        assert p.name == name and p.choice.requested == name
        assert (p.scaler is not None) == (name == "fp16")  # only fp16 needs loss scaling


def test_auto_without_declared_bf16_is_fp32_without_measuring(monkeypatch) -> None:
    monkeypatch.setattr(P, "cpu_features", lambda: ["avx2", "torch:avx2"])
    monkeypatch.setattr(P, "matmul_speedup", lambda *a: pytest.fail("must not measure"))
    c = P.choose("auto", "cpu")
    assert c.name == "fp32" and "declares no bf16" in c.reason and "avx2" in c.reason


@pytest.mark.parametrize(("speedup", "want"), [(0.007, "fp32"), (0.53, "fp32"), (1.29, "fp32"),
                                               (1.3, "bf16"), (3.8, "bf16")])
def test_auto_follows_the_measured_speedup(monkeypatch, speedup: float, want: str) -> None:
    monkeypatch.setattr(P, "cpu_features", lambda: ["avx512_bf16", "torch:avx512"])
    monkeypatch.setattr(P, "matmul_speedup", lambda *a: speedup)
    c = P.choose("auto", "cpu")
    assert c.name == want and f"{speedup:.2f}x fp32" in c.reason
    assert c.line().startswith(f"precision auto -> {want}: measured")


def test_slow_explicit_bf16_runs_with_a_one_line_warning_once(monkeypatch, capsys) -> None:
    monkeypatch.setattr(P, "matmul_speedup", lambda *a: 0.0073)
    monkeypatch.setattr(P, "_WARNED", set())
    c = P.choose("bf16", "cpu")
    assert c.name == "bf16" and "0.0073x fp32" in c.reason
    P.choose("bf16", "cpu")  # a stage and its loop both resolve it: one warning
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0.0073x fp32" in err[0] and "137x slower" in err[0]


def test_speedup_probe_is_a_ratio_of_real_measurements() -> None:
    """fp32 against itself is 1 up to timing noise; cached, so a process measures once."""
    P.matmul_speedup.cache_clear()
    r = P.matmul_speedup(torch.float32, 64)
    assert 0.2 < r < 5  # the same kernel twice: only scheduling noise separates them
    assert P.matmul_speedup(torch.float32, 64) == r


def test_peak_is_at_least_each_shape_it_tried() -> None:
    peak = P.peak_flops(torch.float32)
    a = torch.randn(256, 256)
    assert peak >= 0.5 * P._best_flops(a, a, 1, 0.01)  # best-of: noise may favour either once
