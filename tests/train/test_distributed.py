"""The one loop on two processes (gloo, CPU): DDP on the same global batch gives the
single-process run's losses and weights, in float64 so the bounds measure the loop; a global
batch that two ranks cannot split is one line on every rank, before any step; `lmforge
pretrain` and `lmforge sft` under torchrun, and a stage that cannot run distributed refused
in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lmforge.config import OptimCfg
from lmforge.data.pack import TokenWindows
from lmforge.errors import UserError
from lmforge.io import read_jsonl
from lmforge.train.loop import Trainer
from tests.conftest import QUIET, ROOT, SEQ, VOCAB, lm_task, micro_llama, run_cli, train_cfg

MICRO, STEPS = 2, 3


def _run(run_dir: Path, ids: Path, parallel: str = "ddp", accum: int = 4, steps: int = STEPS,
         model: torch.nn.Module | None = None) -> Trainer:
    """The pretrain task, float64, on a global batch of 4 micro-batches whose last holds one
    sequence, not two: ranks get shares of unequal size (an uneven last batch)."""
    model = model if model is not None else micro_llama().double()
    windows = TokenWindows(ids, "uint16", SEQ)
    cfg = train_cfg(max_steps=steps, micro_batch_size=MICRO, grad_accum=accum, parallel=parallel,
                    save_every=2, keep_last=3)
    task = lm_task(model, windows, MICRO, accum)
    even = task.batches
    task.batches = lambda n: [*even(n)[:-1], even(n)[-1][:1]]
    tr = Trainer(cfg, OptimCfg(lr=1e-3), QUIET, run_dir, model, task)
    tr.run()
    return tr


def _rank(rank: int, world: int, rendezvous: str, run_dir: str, ids: str, kw: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    try:
        _run(Path(run_dir), Path(ids), **kw)
    finally:
        dist.destroy_process_group()


def _spawn(run_dir: Path, ids: Path, **kw: Any) -> Path:
    mp.spawn(_rank, args=(2, f"{run_dir}.rdzv", str(run_dir), str(ids), kw), nprocs=2, join=True)
    return run_dir


def _result(run_dir: Path) -> tuple[list[float], dict[str, Any]]:
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    return losses, load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 3 steps on one process, on 2 ranks with DDP and on 2 with FSDP (both
    checkpointing at step 2), run once for the tests below."""
    root = tmp_path_factory.mktemp("ranks")
    ids = root / "train.bin"
    np.random.default_rng(0).integers(0, VOCAB, size=5000).astype(np.uint16).tofile(ids)
    _run(root / "one", ids)
    return {"ids": ids, "one": root / "one", "ddp": _spawn(root / "ddp", ids),
            "fsdp": _spawn(root / "fsdp", ids, parallel="fsdp")}


# The same sequences' gradients summed in another order (DDP: two shares all-reduced; FSDP:
# reduce-scattered shards) differ by rounding, ~8 * 2^-53 relative: losses are held to 1e-12,
# and weights, which Adam moves by at most lr * d / eps = 1e-3 * 1e-14 / 1e-8 = 1e-9 a step
# for a gradient difference d, to 1e-8 after 3 steps (the argument of tests/train/test_loop.py's
# accumulation test).
LOSS_TOL, WEIGHT_TOL = 1e-12, 1e-8


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(runs: dict[str, Path], parallel: str) -> None:
    """Global batch of 4 micro-batches (7 sequences): one process accumulates all four; each
    of two ranks two (4 sequences and 3), and DDP averages, or FSDP reduce-scatters, their
    gradients. final/ of FSDP is gathered from the shards into a plain HF model."""
    (loss_1, w_1), (loss_2, w_2) = _result(runs["one"]), _result(runs[parallel])
    assert len(loss_1) == STEPS and loss_2 == pytest.approx(loss_1, abs=LOSS_TOL)
    assert _max_diff(w_1, w_2) < WEIGHT_TOL
    # rank 0 alone wrote: one row per step; checkpoints are sharded (dcp/), final/ is HF
    assert [r["step"] for r in read_jsonl(runs[parallel] / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (runs[parallel] / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert (runs[parallel] / "checkpoints" / "step-2" / "dcp" / ".metadata").exists()
    tokens = [r["tokens"] for r in read_jsonl(runs[parallel] / "metrics.jsonl")]
    assert tokens[-1] == STEPS * (MICRO * 3 + 1) * SEQ  # both ranks' tokens counted


def _grads_averaged(rank: int, world: int, rendezvous: str) -> None:
    """Each rank's own batch through the model's forward (logits), through `final_hidden`
    with the head applied apart (the RL, reward-model and distillation stages' way), and
    through two models trained as one (PPO's actor and critic, each called apart): after
    backward every rank holds the mean of the ranks' gradients, which it checks against its
    own all-reduce of them."""
    import torch.distributed as dist

    from lmforge.models import final_hidden
    from lmforge.train import distributed
    from lmforge.train.checkpoint import Composite

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        for way in ("forward", "final_hidden", "composite"):
            model = (Composite(actor=micro_llama().double(), critic=micro_llama(1).double())
                     if way == "composite" else micro_llama().double())
            distributed.replicate(model)
            x = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(rank))
            pos = torch.arange(SEQ).repeat(2, 1)
            if way == "composite":
                actor, critic = model.actor, model.critic
                logits = torch.cat([actor(input_ids=x, position_ids=pos).logits,
                                    critic.lm_head(final_hidden(critic, x, pos))])
            else:
                logits = (model(input_ids=x, position_ids=pos).logits if way == "forward"
                          else model.lm_head(final_hidden(model, x, pos)))
            logits.logsumexp(-1).mean().backward()
            for name, p in model.named_parameters():
                own = p.grad.clone()
                dist.all_reduce(own)  # the sum of what each rank now holds: world x the mean
                assert torch.allclose(own / world, p.grad, rtol=0, atol=1e-12), (way, name)
    finally:
        dist.destroy_process_group()


def test_gradients_are_averaged_however_a_stage_calls_the_model(tmp_path: Path) -> None:
    """DDP averages in backward only what went through the root's forward hooks: a body
    called directly would leave each rank on its own gradients, silently."""
    mp.spawn(_grads_averaged, args=(2, str(tmp_path / "rdzv")), nprocs=2, join=True)


def test_a_short_step_is_padded_with_weight_0_repeats() -> None:
    """Three micro-batches (weights 1, 2, 3) over 2 ranks: rank 0 trains a and b; rank 1 c
    and a weight-0 repeat of c, which adds nothing to the weighted sum yet keeps the ranks'
    backward counts equal. The weights over all shares still sum to 6, and only 3 are real."""
    from lmforge.train.distributed import Dist, share

    parts = [share(["a", "b", "c"], [1.0, 2.0, 3.0], Dist(r, 2)) for r in range(2)]
    assert parts == [(["a", "b"], [1.0, 2.0], 2), (["c", "c"], [3.0, 0.0], 1)]
    assert share(["a", "b"], [1.0, 2.0], Dist(1, 4)) == (["b"], [2.0], 1)
    assert share(["a", "b"], [1.0, 2.0], Dist(3, 4)) == (["b"], [0.0], 0)


def _from_step_2(runs: dict[str, Path], name: str) -> Path:
    """A copy of the FSDP run as if stopped after its step-2 checkpoint."""
    d = runs["fsdp"].parent / name
    shutil.copytree(runs["fsdp"], d)
    shutil.rmtree(d / "checkpoints" / "step-3")
    shutil.rmtree(d / "final")
    return d


def test_a_checkpoint_of_two_ranks_resumes_on_one_and_on_two(runs: dict[str, Path]) -> None:
    """The step-2 checkpoint the 2 FSDP ranks wrote (shards, no gather) resumes on one
    process and on 2 ranks with DDP; step 3's loss and the final weights are the run's that
    never stopped, to the bounds above."""
    on_one = _run(_from_step_2(runs, "on_one"), runs["ids"])
    on_two = _spawn(_from_step_2(runs, "on_two"), runs["ids"])
    loss, weights = _result(runs["fsdp"])
    for d in (on_one.run_dir, on_two):
        loss_r, weights_r = _result(d)
        assert loss_r == pytest.approx(loss, abs=LOSS_TOL)  # rows 1-2 kept, row 3 new
        assert _max_diff(weights, weights_r) < WEIGHT_TOL


def test_a_checkpoint_of_another_model_is_one_line(runs: dict[str, Path]) -> None:
    d = _from_step_2(runs, "other")
    other = micro_llama(vocab=VOCAB + 8).double()
    with pytest.raises(UserError, match=r"^checkpoint .*step-2 does not match the model \(Size mismatch .*embed_tokens"):
        _run(d, runs["ids"], model=other)


def test_a_global_batch_two_ranks_cannot_split_is_one_line(runs: dict[str, Path]) -> None:
    run_dir = runs["one"].parent / "odd"
    with pytest.raises(mp.ProcessRaisedException) as e:
        _spawn(run_dir, runs["ids"], accum=3)
    assert "3 micro-batches a step cannot be split over 2 ranks (train.grad_accum=3" in str(e.value)
    assert not (run_dir / "metrics.jsonl").exists()


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "lmforge.cli", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


DDP_OVER = ["train.micro_batch_size=2", "train.grad_accum=2", "train.eval_every=0",
            "log.every=1", "log.progress=off"]


def _two_ranks_and_one(tmp_path: Path, stage: str, over: list[str], steps: int,
                       ranks_only: tuple[str, ...] = ()) -> None:
    """The stage on 2 ranks (run.dir two/) and on 1 (one/): rank 0 alone wrote one row a
    step, and the first step's loss (the same weights on the same global batch of 2 x 2
    sequences, before any update) equals one process's up to fp32 summation order, a few ulps
    of a loss of a few nats: held to 1e-5 relative."""
    over = [*over, f"train.max_steps={steps}", *DDP_OVER]
    r = _torchrun(tmp_path, stage, *over, *ranks_only, f"run.dir={tmp_path / 'two'}")
    assert r.returncode == 0, r.stderr[-3000:]
    one = run_cli(stage, *over, f"run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    rows = {n: [x for x in read_jsonl(tmp_path / n / "metrics.jsonl") if "loss" in x]
            for n in ("one", "two")}
    assert [x["step"] for x in rows["two"]] == list(range(1, steps + 1))
    assert rows["two"][0]["loss"] == pytest.approx(rows["one"][0]["loss"], rel=1e-5)


@pytest.mark.slow  # torchrun + one process, ~20 s each: `make test-slow`
def test_pretrain_under_torchrun_equals_one_process_at_step_1(tiny_run: Path, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m lmforge.cli pretrain`."""
    _two_ranks_and_one(tmp_path, "pretrain", [
        str(ROOT / "configs/pretrain/tiny.yaml"), f"data.corpus={tiny_run / 'corpus'}",
        f"data.tokenizer={tiny_run / 'tokenizer'}"], 3)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 3
    assert load_file(str(tmp_path / "two" / "final" / "model.safetensors"))


@pytest.mark.slow  # torchrun + one process, ~20 s each: `make test-slow`
def test_sft_lora_under_fsdp_equals_one_process_at_step_1(tiny_run: Path, tmp_path: Path) -> None:
    """LoRA adapters sharded with their blocks' frozen weights; the held-out pass@1 before and
    after is computed on every rank alike (the sharded model's forward runs in lockstep),
    written once; final/ (merged model and adapter) exported from the gathered weights."""
    _two_ranks_and_one(tmp_path, "sft", [
        str(ROOT / "configs/sft/tiny.yaml"), f"model.path={tiny_run / 'pretrain'}",
        f"forgetting.general={tiny_run / 'corpus'}", "lora.method=lora"], 2, ("train.parallel=fsdp",))
    for when in ("before", "after"):  # one writer: as many rows as one process writes
        evals = {n: list(read_jsonl(tmp_path / n / f"eval_{when}.jsonl")) for n in ("one", "two")}
        assert len(evals["two"]) == len(evals["one"]) > 0
    assert (tmp_path / "two" / "final" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "two" / "checkpoints" / "step-2" / "dcp" / ".metadata").exists()


@pytest.mark.slow  # torchrun + one process, ~20 s each: `make test-slow`
def test_dpo_under_fsdp_equals_one_process_at_step_1(tiny_run: Path, tmp_path: Path) -> None:
    """The reference log-probs are computed and cached by rank 0, read by rank 1."""
    _two_ranks_and_one(tmp_path, "dpo", [
        str(ROOT / "configs/dpo/tiny.yaml"), f"model.path={tiny_run / 'sft'}",
        f"data.train={tiny_run / 'pairs'}"], 2, ("train.parallel=fsdp",))
    assert len(list((tmp_path / "two" / "ref_cache").glob("ref-*.safetensors"))) == 2


@pytest.mark.slow  # torchrun + one process, ~20 s each: `make test-slow`
def test_grpo_under_torchrun_samples_each_ranks_prompts_and_gathers_rewards(
        tiny_run: Path, tmp_path: Path) -> None:
    """Each rank samples its share of a round's prompts and every rank receives all the
    groups: rank 0 logs each round's P x G rollouts once, of the prompts one process picks for
    that round, and the step's reward/mean is the mean over all of them."""
    over = [str(ROOT / "configs/grpo/tiny.yaml"), f"model.path={tiny_run / 'sft'}",
            "train.max_steps=2", "train.micro_batch_size=2", "log.every=1", "log.progress=off"]
    r = _torchrun(tmp_path, "grpo", *over, f"run.dir={tmp_path / 'two'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_cli("grpo", *over, f"run.dir={tmp_path / 'one'}").returncode == 0
    logged = {n: list(read_jsonl(tmp_path / n / "rollouts.jsonl")) for n in ("one", "two")}
    rows = [x for x in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "reward/mean" in x]
    for k in range(2):
        two = [x for x in logged["two"] if x["round"] == k]
        assert len(two) == 2 * 4  # prompts_per_step x group_size, written once
        assert sorted(x["task_id"] for x in two) == sorted(
            x["task_id"] for x in logged["one"] if x["round"] == k)
        assert rows[k]["reward/mean"] == pytest.approx(sum(x["reward"] for x in two) / len(two),
                                                       abs=1e-12)


@pytest.mark.parametrize("stage, over, says", [
    ("ppo", ["critic.share_base=true", "lora.method=lora", "critic.lora.method=lora"],
     "critic.share_base under torchrun"),
    ("grpo", ["train.parallel=fsdp"], "train.parallel=fsdp: grpo cannot shard its model")])
def test_a_setting_that_cannot_run_distributed_says_so_once(
        tiny_run: Path, tmp_path: Path, stage: str, over: list[str], says: str) -> None:
    r = _torchrun(tmp_path, stage, str(ROOT / f"configs/{stage}/tiny.yaml"),
                  f"model.path={tiny_run / 'sft'}", f"run.dir={tmp_path / stage}", *over)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith(f"lmforge {stage}: error:")]
    assert len(lines) == 1 and says in lines[0], r.stderr[-2000:]
    assert not (tmp_path / stage / "summary.json").exists()


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
