"""Reward functions: worked values, and that a code reward is only earned by answers whose
tests really ran and compared real values."""

from __future__ import annotations

import pytest

from lmforge.rl.config import (
    AnswerRewardCfg,
    CodeRewardCfg,
    FormatRewardCfg,
    GrpoCfg,
    LengthRewardCfg,
)
from lmforge.rl.rewards import Answer, Env, score_rollouts
from lmforge.sandbox import Limits
from lmforge.tasks.base import AnswerItem
from lmforge.tasks.gsm8k import score_completion
from lmforge.tasks.synthetic_code import make_splits, to_code_items

ENV = Env(Limits(timeout_s=5.0), workers=2)


@pytest.fixture(scope="module")
def item():
    return to_code_items(make_splits(0, 40, 2).train[:1])[0]


def test_length_penalty_worked() -> None:
    """max 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 from 10 on."""
    cfg = LengthRewardCfg(max_tokens=10, buffer=4)
    got = score_rollouts([cfg], [Answer(None, "", n) for n in (3, 6, 7, 8, 10, 12)], ENV)[1]["length"]
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]


def test_weighted_sum_and_parts(item) -> None:
    """total = sum of weight * value; each part reported unweighted."""
    cfgs = [FormatRewardCfg(weight=0.5), LengthRewardCfg(weight=2.0, max_tokens=10, buffer=4)]
    answers = [Answer(item, item.reference, 8), Answer(item, "    return (", 3)]
    total, parts = score_rollouts(cfgs, answers, ENV)
    assert parts == {"format": [1.0, 0.0], "length": [-0.5, 0.0]}
    assert total == [0.5 * 1.0 + 2.0 * -0.5, 0.0]


def test_code_reward_runs_the_tests(item) -> None:
    """The reference passes; a wrong body and an answer that exits before the tests do not;
    an object equal to everything does not (the tests compare exact builtin types)."""
    cheats = [
        "\n    return None",
        "\n    import os; os._exit(0)",
        "\n    class E:\n        def __eq__(s, o): return True\n    return E()",
        "\n    raise SystemExit(0)",
    ]
    answers = [Answer(item, item.reference, 10), *[Answer(item, c, 10) for c in cheats]]
    total, _ = score_rollouts([CodeRewardCfg()], answers, ENV)
    assert total == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_answer_and_format_for_gsm8k() -> None:
    from functools import partial

    it = AnswerItem("g/1", "Q?", "...#### 42", "42", partial(score_completion, reference="42"))
    answers = [Answer(it, "so #### 42", 4), Answer(it, "it is 41", 4), Answer(it, "no idea", 2)]
    total, parts = score_rollouts([AnswerRewardCfg(), FormatRewardCfg(weight=0.1)], answers, ENV)
    assert parts["answer"] == [1.0, 0.0, 0.0] and parts["format"] == [1.0, 1.0, 0.0]
    assert total == pytest.approx([1.1, 0.1, 0.0])


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="at most once"):
        GrpoCfg(rewards=[CodeRewardCfg(), CodeRewardCfg()])
    with pytest.raises(ValueError, match="GSM8K"):
        GrpoCfg(rewards=[AnswerRewardCfg()])
    with pytest.raises(ValueError, match="code prompts"):
        GrpoCfg(data={"train": "gsm8k"}, rewards=[CodeRewardCfg()])


def test_combine_scores_worked() -> None:
    from lmforge.rl.rewards import combine_scores

    assert combine_scores([[1.0, 4.0], [3.0, 0.0]], "mean") == [2.0, 2.0]
    assert combine_scores([[1.0, 4.0], [3.0, 0.0]], "min") == [1.0, 0.0]
    assert combine_scores([[1.5, -2.0]], "min") == [1.5, -2.0]  # one member: its own scores


def test_reward_model_ensemble_is_its_members_combined(tmp_path) -> None:
    """Two reward models (random heads, different seeds) as one reward: per answer the mean or
    the min of what each scores alone, each standardized by its own training scores' mean
    and std (which a member must have)."""
    import json
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lmforge.chat import BUILTINS
    from lmforge.errors import UserError
    from lmforge.models import save_hf
    from lmforge.rl.config import RewardModelCfg
    from lmforge.rl.rewards import member_scale, reward_model_reward, reward_model_scores
    from tests.conftest import BOS_ID, EOS_ID, PAD_ID, make_chat_tokenizer

    dirs = []
    for seed in (0, 1):
        tok = make_chat_tokenizer(tmp_path / f"tok{seed}")
        tok.chat_template = BUILTINS["lmforge"].template
        conf = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=256, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                           pad_token_id=PAD_ID, num_labels=1)
        torch.manual_seed(seed)
        save_hf(LlamaForSequenceClassification(conf), tmp_path / f"rm{seed}", tok)
        dirs.append(str(tmp_path / f"rm{seed}"))
    items = to_code_items(make_splits(0, 4, 1).train[:2], signature_prefill=True)
    answers = [Answer(it, text, 3) for it in items for text in ("\n    return x", "\n    pass")]
    env = Env(Limits(timeout_s=5), 1)
    prompts = [[{"role": "user", "content": a.item.prompt}] for a in answers]
    texts = [a.item.head + a.text for a in answers]
    with pytest.raises(UserError, match="reward_stats.json"):  # no scale, no ensemble
        reward_model_reward(RewardModelCfg(path=dirs), answers, env)
    scale = [(0.5, 2.0), (-1.0, 0.25)]  # as the rm stage writes them
    for d, (m, sd) in zip(dirs, scale):
        (Path(d) / "reward_stats.json").write_text(json.dumps({"mean": m, "std": sd}))
    member_scale.cache_clear()
    alone = [[(x - m) / sd for x in reward_model_scores(d, None, prompts, texts, 4)]
             for d, (m, sd) in zip(dirs, scale)]
    for how, f in (("mean", lambda a, b: (a + b) / 2), ("min", min)):
        got = reward_model_reward(RewardModelCfg(path=dirs, combine=how), answers, env)
        assert got == pytest.approx([f(a, b) for a, b in zip(*alone)], rel=1e-12)
    one = reward_model_reward(RewardModelCfg(path=dirs[0]), answers, env)  # alone: raw scores
    assert one == reward_model_scores(dirs[0], None, prompts, texts, 4)
    with pytest.raises(ValueError, match="at least one"):
        RewardModelCfg(path=[])
