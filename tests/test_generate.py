"""Sampling: greedy is deterministic and matches argmax decoding; stop strings cut the text."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import UserError
from lmforge.generate import SampleCfg, cut_at_stop, generate
from lmforge.tokenizer import save_tokenizer, train_bpe
from tests.conftest import micro_llama


def test_cut_at_stop() -> None:
    assert cut_at_stop("abc\n\ndef", ("\n\n",)) == "abc"
    assert cut_at_stop("a;b.c", (".", ";")) == "a"  # the earliest of several
    assert cut_at_stop("abc", ()) == "abc"


def test_greedy_equals_argmax_loop(tmp_path) -> None:
    tok = save_tokenizer(train_bpe(["abc def ghi " * 20] * 5, 264, ["<e>", "<p>"], 1), tmp_path,
                         bos_token="<e>", eos_token="<e>", pad_token="<p>", extra_special_tokens=[])
    model = micro_llama(vocab=len(tok)).eval()
    out = generate(model, tok, ["abc"], SampleCfg(max_new_tokens=6, temperature=0))[0]
    ids = [tok.eos_token_id, *tok("abc", add_special_tokens=False)["input_ids"]]
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
    assert out == tok.decode(new, skip_special_tokens=True)
    a = generate(model, tok, ["abc"], SampleCfg(max_new_tokens=6, temperature=1.0, seed=3))
    assert a == generate(model, tok, ["abc"], SampleCfg(max_new_tokens=6, temperature=1.0, seed=3))


def test_bad_sampling_settings() -> None:
    with pytest.raises(UserError, match="top_p"):
        SampleCfg(top_p=1.5).check()
    with pytest.raises(UserError, match="temperature"):
        SampleCfg(temperature=-0.1).check()


@pytest.mark.parametrize("kw", [{"temperature": float("nan")}, {"temperature": float("inf")},
                                {"top_p": float("nan")}, {"top_p": float("inf")}])
def test_non_finite_sampling_settings_are_refused(kw: dict[str, float]) -> None:
    # nan compares False with everything: unchecked, `temperature > 0` is False and
    # generation silently turns greedy
    with pytest.raises(UserError, match=next(iter(kw))):
        SampleCfg(**kw).check()
