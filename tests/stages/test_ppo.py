"""The ppo stage on the tiny pipeline's DPO model and the synthetic task: a round's returns and
advantages against their closed forms, the first step's two losses worked from that round, an
exact resume in the middle of a multi-epoch round with the adaptive KL coefficient, the memory
report, and bad settings as one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.io import read_jsonl
from lmforge.rl.config import PpoCfg
from lmforge.stages import run_stage
from lmforge.stages.ppo import completion_values, setup
from tests.conftest import ROOT, run_cli
from tests.stages.test_grpo import _rows, _same_weights
from tests.stages.test_pairs import reward_model  # noqa: F401 (a fixture)


def ppo_cfg(tiny_run: Path, out: Path, *over: str) -> PpoCfg:
    return load_config(PpoCfg, ROOT / "configs/ppo/tiny.yaml",
                       [f"model.path={tiny_run / 'dpo'}", f"run.dir={out}", "log.progress=off",
                        "eval.task=null", *over])


def test_pipeline_ppo_outputs(tiny_run: Path) -> None:
    """The tiny pipeline's ppo stage: its summary, both models written, and its part of the
    report's online-RL section (memory per model, the KL coefficient, pass@1 next to GRPO's)."""
    s = json.loads((tiny_run / "ppo" / "summary.json").read_text())
    assert s["steps"] == 4 and s["rollouts"]["per_step"] == 8 and set(s["memory_mb"]) >= {"actor", "critic"}
    assert (tiny_run / "ppo" / "final" / "config.json").exists()
    assert (tiny_run / "ppo" / "critic" / "config.json").exists()
    row = read_jsonl(tiny_run / "ppo" / "metrics.jsonl")[0]
    for k in ("pg_loss", "vf_loss", "vf_clipfrac", "explained_variance", "kl/seq", "kl/coef",
              "reward/score", "reward/shaped", "value/returns", "clip_frac", "time/gen_s"):
        assert k in row, k
    report = (tiny_run / "report.md").read_text()
    assert report.count("## Online RL") == 1 and "### ppo" in report and "### grpo" in report
    assert "- memory (MiB): actor" in report and "| ppo |" in report


CLOSED = ["gae.gamma=1", "gae.lam=1", "whiten_advantages=false", "kl.coef=0.1", "mu=1",
          "train.max_steps=1"]


SHARED = ["lora.method=lora", "critic.lora.method=lora", "critic.share_base=true"]
MODES = {"separate": [], "shared": SHARED}


@pytest.mark.parametrize("mode", list(MODES))
def test_first_round_and_step_closed_form(tiny_run: Path, tmp_path: Path, mode: str) -> None:
    """gamma = lam = 1, no whitening: a token's return is its completion's score minus the KL
    penalty still to come, and the reference is the starting policy, so in round 0 the KL is
    0 and every return is the score; the advantage is the return minus the critic's value.
    Step 1 (actor = sampler, critic = its own old values, no clipping active) then has
    pg_loss = -mean_t(A_t) and vf_loss = 0.5 mean_t (V_t - R_t)^2 over the round's tokens.
    fp32 sums of ~200 O(1) terms: 1e-5 bounds the rounding, and a token misaligned between
    values and returns moves them by far more."""
    cfg = ppo_cfg(tiny_run, tmp_path / "probe", *CLOSED, *MODES[mode])
    cfg.run.dir.mkdir(parents=True)
    s = setup(cfg)
    rnd = s.rounds.make(0)
    scores = [r["reward"] for r in read_jsonl(cfg.run.dir / "rollouts.jsonl")]
    adv, ret, val, n = [], [], [], 0
    for b in rnd.batches:
        m = b["completion_mask"].bool()
        rows = len(m)
        with torch.no_grad():
            v = completion_values(s.critic, b)
        torch.testing.assert_close(b["old_values"], v, rtol=0, atol=0)  # the critic's own
        want = torch.tensor(scores[n:n + rows], dtype=torch.float32)[:, None].expand_as(m)
        torch.testing.assert_close(b["returns"][m], want[m], rtol=0, atol=1e-6)
        torch.testing.assert_close(b["advantages"][m], (b["returns"] - b["old_values"])[m],
                                   rtol=0, atol=1e-6)
        adv.append(b["advantages"][m])
        ret.append(b["returns"][m])
        val.append(b["old_values"][m])
        n += rows
    assert rnd.metrics["kl/seq"] == 0.0 and n == len(scores) == 8
    A, R, V = (torch.cat(x).double() for x in (adv, ret, val))
    summary = run_stage("ppo", ppo_cfg(tiny_run, tmp_path / "run", *CLOSED, *MODES[mode]))
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["ratio/mean"] == 1.0 and row["clip_frac"] == 0.0 and row["vf_clipfrac"] == 0.0
    assert abs(row["pg_loss"] - float(-A.mean())) < 1e-5
    assert abs(row["vf_loss"] - float(0.5 * (V - R).square().mean())) < 1e-5
    assert abs(row["loss"] - (row["pg_loss"] + 0.1 * row["vf_loss"])) < 1e-6  # vf_coef 0.1
    mem = summary["memory_mb"]
    assert set(mem) == {"actor", "critic", "reference"}
    if mode == "separate":  # a second transformer, and a frozen copy for the reference
        assert mem["reference"] == mem["actor"] > 0 and mem["critic"] > 0.9 * mem["actor"]
        assert (tmp_path / "run" / "critic" / "config.json").exists()
    else:  # an adapter and a head on the actor's base; the reference is that base
        assert mem["reference"] == 0 and 0 < mem["critic"] < 0.2 * mem["actor"]
        assert (tmp_path / "run" / "critic" / "critic_head.safetensors").exists()


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_mid_round_with_adaptive_kl_is_exact(tiny_run: Path, tmp_path: Path, mode: str) -> None:
    """mu = 2 and an adaptive KL coefficient: the checkpoint after step 1 is in the middle of a
    round and the coefficient for round 1 was set by round 0's KL. Resumed from it, the run
    repeats the uninterrupted one's rows and both models' final weights, bit for bit."""
    over = ["mu=2", "train.max_steps=4", "train.save_every=1", "train.keep_last=4",
            "optim.lr=1e-3", "kl.target=0.01", "kl.horizon=10", *MODES[mode]]
    straight = run_stage("ppo", ppo_cfg(tiny_run, tmp_path / "straight", *over))
    assert straight["kl"]["coef_end"] != 0.05  # the controller moved it
    ckpt = tmp_path / "straight/checkpoints/step-1"
    assert {p.name for p in ckpt.iterdir()} >= {"actor", "critic"}
    shutil.copytree(ckpt, tmp_path / "split/checkpoints/step-1")
    split = run_stage("ppo", ppo_cfg(tiny_run, tmp_path / "split", *over))
    assert _rows(tmp_path / "split") == _rows(tmp_path / "straight")[1:]
    assert split["kl"] == straight["kl"]
    assert _same_weights(tmp_path / "straight/final", tmp_path / "split/final")
    if mode == "separate":
        assert _same_weights(tmp_path / "straight/critic", tmp_path / "split/critic")
    else:
        a, b = (load_file(str(tmp_path / d / "critic" / "critic_head.safetensors"))
                for d in ("straight", "split"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every parameter the optimizer holds got a gradient (a frozen critic would have no state)
    opt = torch.load(tmp_path / "straight/checkpoints/step-4/trainer_state.pt", weights_only=True)["optimizer"]
    assert len(opt["state"]) == sum(len(g["params"]) for g in opt["param_groups"])
    coefs = [r["kl/coef"] for r in read_jsonl(tmp_path / "straight/metrics.jsonl")]
    assert coefs[0] == coefs[1] == 0.05 and coefs[2] == coefs[3] != 0.05  # per round


@pytest.mark.parametrize("over, needle", [
    (["kl.coef=0.1", "ref.kind=none"], "kl.coef"),
    (["critic.lora.method=qlora"], "critic.lora.method"),
    (["rewards=[{kind: answer}]"], "answer"),
    (["train.grad_accum=2"], "grad_accum"),
    (["critic.share_base=true"], "critic.share_base"),
])
def test_bad_settings_are_one_line(tiny_run: Path, tmp_path: Path, over: list[str], needle: str) -> None:
    r = run_cli("ppo", str(ROOT / "configs/ppo/tiny.yaml"), f"model.path={tiny_run / 'dpo'}",
                f"run.dir={tmp_path / 'bad'}", *over, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_a_reward_model_of_another_tokenizer_is_one_line_before_any_rollout(
        tiny_run: Path, reward_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """The fixture RM has a 320-token vocabulary of its own, not the tiny run's."""
    rm = f"[{{kind: reward_model, path: {reward_model}}}]"
    r = run_cli("ppo", str(ROOT / "configs/ppo/tiny.yaml"), f"model.path={tiny_run / 'dpo'}",
                f"run.dir={tmp_path / 'bad'}", f"rewards={rm}", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert f"reward model {reward_model}: its tokenizer differs from the policy's" in r.stderr
    assert "other_tokenizer: true" in r.stderr and "round 1" not in r.stdout


def test_reward_model_check_allows_another_tokenizer_when_asked(
        tiny_run: Path, reward_model: Path) -> None:  # noqa: F811
    from lmforge.errors import UserError
    from lmforge.rl.config import RewardModelCfg
    from lmforge.rl.rewards import check_reward_models
    from lmforge.tokenizer import load_tokenizer

    policy_tok = load_tokenizer(str(tiny_run / "dpo" / "final"))
    own = load_tokenizer(str(reward_model))
    check_reward_models([RewardModelCfg(path=str(reward_model))], own)  # the same vocabulary
    with pytest.raises(UserError, match="differs from the policy's"):
        check_reward_models([RewardModelCfg(path=[str(reward_model)])], policy_tok)
    check_reward_models([RewardModelCfg(path=str(reward_model), other_tokenizer=True)], policy_tok)
    with pytest.raises(UserError, match="reward model path not found"):
        check_reward_models([RewardModelCfg(path=str(tiny_run / "no-rm"))], policy_tok)


def test_lora_actor_references_its_base_and_holds_no_copy(tiny_run: Path, tmp_path: Path) -> None:
    s = run_stage("ppo", ppo_cfg(tiny_run, tmp_path / "lora", "lora.method=lora",
                                 "train.max_steps=1", "mu=1"))
    assert s["reference"].startswith("the adapter-disabled base") and s["memory_mb"]["reference"] == 0.0
    cfg = json.loads((tmp_path / "lora" / "final" / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForCausalLM")  # final/ is the merged actor


def test_shared_critic_one_backward_reaches_both_adapters_and_keeps_the_base() -> None:
    """Actor forward (its adapter), then critic forward (the critic's adapter, switched on for
    the call), one backward of the sum: both adapters get their gradient, as two separate
    models would (each adapter's own gradient, from its own term), and the base none.
    fp64, one small batch: the two routes sum the same products, so 1e-12 relative."""
    import copy

    from peft import PeftModel

    from lmforge.config import LoraCfg
    from lmforge.models import apply_lora
    from lmforge.rl.critic import ADAPTER, SharedCritic, completion_values
    from tests.conftest import VOCAB, micro_llama

    actor = apply_lora(micro_llama().double(), LoraCfg(method="lora", r=4), [])
    critic = SharedCritic(actor, LoraCfg(method="lora", r=4), seed=0)
    critic.head.double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would leave the A gradients 0: move every adapter
        for n, p in actor.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    b = {"input_ids": ids, "position_ids": torch.arange(6).expand(2, 6),
         "seq_ids": torch.tensor([[0] * 6, [1] * 6]), "completion_mask": torch.ones(2, 6, dtype=torch.long)}

    def actor_term(m: PeftModel) -> torch.Tensor:
        return m(input_ids=ids).logits.double().square().mean()

    with torch.no_grad(), actor.disable_adapter():  # the reference, as a round computes it:
        actor(input_ids=ids)  # peft freezes every adapter there and unfreezes the active one
    loss = actor_term(actor) + completion_values(critic, b).double().sum()
    loss.backward()
    grads = {n: p.grad for n, p in actor.named_parameters() if "lora_" in n}
    assert {n for n in grads if f".{ADAPTER}." in n} and {n for n in grads if ".default." in n}
    assert all(g is not None for g in grads.values()) and critic.head.weight.grad is not None
    assert all(p.requires_grad for n, p in actor.named_parameters() if "lora_" in n)
    assert not any(p.grad is not None for n, p in actor.named_parameters() if "lora_" not in n)
    assert actor.active_adapter == "default"  # the critic's call left the actor's on
    # the reference: each term alone, through a copy (no sharing): the same gradients
    solo = copy.deepcopy(actor)
    for p in solo.parameters():
        p.grad = None
    actor_term(solo).backward()
    for n, p in solo.named_parameters():
        if "lora_" in n and f".{ADAPTER}." not in n:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-12, atol=0)
