"""The one loop on two processes (gloo, CPU): DDP on the same global batch gives the
single-process run's losses and weights, in float64 so the bounds measure the loop; a global
batch that two ranks cannot split is one line on every rank, before any step; `lmforge
pretrain` and `lmforge sft` under torchrun, and a stage that cannot run distributed refused
in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lmforge.config import OptimCfg
from lmforge.data.pack import TokenWindows
from lmforge.io import read_jsonl
from lmforge.train.loop import Trainer
from tests.conftest import QUIET, ROOT, SEQ, lm_task, micro_llama, run_cli, train_cfg

MICRO, STEPS = 2, 3


def _run(run_dir: Path, ids: Path, accum: int) -> Trainer:
    model = micro_llama().double()
    windows = TokenWindows(ids, "uint16", SEQ)
    cfg = train_cfg(max_steps=STEPS, micro_batch_size=MICRO, grad_accum=accum)
    tr = Trainer(cfg, OptimCfg(lr=1e-3), QUIET, run_dir, model, lm_task(model, windows, MICRO, accum))
    tr.run()
    return tr


def _rank(rank: int, world: int, rendezvous: str, run_dir: str, ids: str, accum: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    try:
        _run(Path(run_dir), Path(ids), accum)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, windows: TokenWindows, accum: int, name: str) -> Path:
    run_dir = tmp_path / name
    mp.spawn(_rank, args=(2, str(tmp_path / f"{name}.rdzv"), str(run_dir),
                          str(windows.data.filename), accum), nprocs=2, join=True)
    return run_dir


def _result(run_dir: Path) -> tuple[list[float], dict[str, Any]]:
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    return losses, load_file(str(run_dir / "final" / "model.safetensors"))


def test_ddp_on_two_ranks_equals_one_process(tmp_path: Path, windows: TokenWindows) -> None:
    """Global batch 2 x 4 micro-batches: one process accumulates all four; each of two ranks
    two, and DDP averages their gradients. The same eight sequences' gradients are summed in
    another order, so they differ by rounding, ~8 * 2^-53 relative: losses are held to 1e-12,
    and weights, which Adam moves by at most lr * d / eps = 1e-3 * 1e-14 / 1e-8 = 1e-9 a step
    for a gradient difference d, to 1e-8 after 3 steps (the argument of
    tests/train/test_loop.py's accumulation test)."""
    _run(tmp_path / "one", Path(windows.data.filename), 4)
    ddp = _spawn(tmp_path, windows, 4, "ddp")
    (loss_1, w_1), (loss_2, w_2) = _result(tmp_path / "one"), _result(ddp)
    assert len(loss_1) == STEPS and loss_2 == pytest.approx(loss_1, abs=1e-12)
    assert max(float((w_1[k] - w_2[k]).abs().max()) for k in w_1) < 1e-8
    # rank 0 alone wrote: one row per step, one checkpoint, one final/
    assert [r["step"] for r in read_jsonl(ddp / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-3"]
    tokens = [r["tokens"] for r in read_jsonl(ddp / "metrics.jsonl")]
    assert tokens[-1] == STEPS * MICRO * 4 * SEQ  # both ranks' tokens counted


def test_a_global_batch_two_ranks_cannot_split_is_one_line(tmp_path: Path,
                                                           windows: TokenWindows) -> None:
    with pytest.raises(mp.ProcessRaisedException) as e:
        _spawn(tmp_path, windows, 3, "odd")
    assert "train.grad_accum=3 micro-batches cannot be split over 2 ranks" in str(e.value)
    assert not (tmp_path / "odd" / "metrics.jsonl").exists()


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "lmforge.cli", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


DDP_OVER = ["train.micro_batch_size=2", "train.grad_accum=2", "train.eval_every=0",
            "log.every=1", "log.progress=off"]


def _two_ranks_and_one(tmp_path: Path, stage: str, over: list[str], steps: int) -> None:
    """The stage on 2 ranks (run.dir two/) and on 1 (one/): rank 0 alone wrote one row a
    step, and the first step's loss (the same weights on the same global batch of 2 x 2
    sequences, before any update) equals one process's up to fp32 summation order, a few ulps
    of a loss of a few nats: held to 1e-5 relative."""
    over = [*over, f"train.max_steps={steps}", *DDP_OVER]
    r = _torchrun(tmp_path, stage, *over, f"run.dir={tmp_path / 'two'}")
    assert r.returncode == 0, r.stderr[-3000:]
    one = run_cli(stage, *over, f"run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    rows = {n: [x for x in read_jsonl(tmp_path / n / "metrics.jsonl") if "loss" in x]
            for n in ("one", "two")}
    assert [x["step"] for x in rows["two"]] == list(range(1, steps + 1))
    assert rows["two"][0]["loss"] == pytest.approx(rows["one"][0]["loss"], rel=1e-5)


def test_pretrain_under_torchrun_equals_one_process_at_step_1(tiny_run: Path, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m lmforge.cli pretrain`."""
    _two_ranks_and_one(tmp_path, "pretrain", [
        str(ROOT / "configs/pretrain/tiny.yaml"), f"data.corpus={tiny_run / 'corpus'}",
        f"data.tokenizer={tiny_run / 'tokenizer'}"], 3)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 3
    assert load_file(str(tmp_path / "two" / "final" / "model.safetensors"))


def test_sft_under_torchrun_equals_one_process_at_step_1(tiny_run: Path, tmp_path: Path) -> None:
    """The held-out pass@1 before and after is computed on every rank alike, written once."""
    _two_ranks_and_one(tmp_path, "sft", [
        str(ROOT / "configs/sft/tiny.yaml"), f"model.path={tiny_run / 'pretrain'}",
        f"forgetting.general={tiny_run / 'corpus'}"], 2)
    for when in ("before", "after"):  # one writer: as many rows as one process writes
        evals = {n: list(read_jsonl(tmp_path / n / f"eval_{when}.jsonl")) for n in ("one", "two")}
        assert len(evals["two"]) == len(evals["one"]) > 0


def test_a_stage_that_cannot_run_distributed_says_so_once(tiny_run: Path, tmp_path: Path) -> None:
    r = _torchrun(tmp_path, "dpo", str(ROOT / "configs/dpo/tiny.yaml"),
                  f"model.path={tiny_run / 'sft'}", f"data.train={tiny_run / 'pairs'}",
                  f"run.dir={tmp_path / 'dpo'}")
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("lmforge dpo: error:")]
    assert len(lines) == 1 and "dpo cannot run on several processes yet" in lines[0]
    assert not (tmp_path / "dpo" / "summary.json").exists()


def _rank_pids(tag: str) -> dict[int, int]:
    """{rank: pid} of the workers whose environment carries `tag` (torchrun sets RANK)."""
    out = {}
    for proc in Path("/proc").iterdir():
        try:
            env = dict(x.split("=", 1) for x in (proc / "environ").read_text().split("\0") if "=" in x)
        except (OSError, ValueError):
            continue
        if env.get("LMFORGE_TEST_TAG") == tag and "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            out[int(env["RANK"])] = int(proc.name)
    return out


def test_a_rank_that_dies_ends_the_run_with_an_error_not_a_hang(tiny_run: Path, tmp_path: Path) -> None:
    """Rank 1 is killed mid-run: the run ends non-zero within a bounded time (the launcher
    stops the other rank; the loop's collectives fail instead of waiting), naming the dead
    rank, and no final/ or summary.json looks finished."""
    import os
    import signal
    import time

    tag = f"{os.getpid()}-{time.time()}"
    run_dir = tmp_path / "dies"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmforge.cli", "pretrain", str(ROOT / "configs/pretrain/tiny.yaml"),
           f"data.corpus={tiny_run / 'corpus'}", f"data.tokenizer={tiny_run / 'tokenizer'}",
           "train.max_steps=100000", "train.micro_batch_size=2", "train.grad_accum=2",
           "train.eval_every=0", "log.every=1", "log.progress=off", f"run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "LMFORGE_TEST_TAG": tag})
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        pids = _rank_pids(tag)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        assert time.monotonic() - t0 < 120
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "local_rank: 1" in err or "rank: 1" in err, err[-2000:]
    assert not (run_dir / "summary.json").exists() and not (run_dir / "final").exists()
