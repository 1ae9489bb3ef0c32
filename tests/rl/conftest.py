"""What the rollout engines' tests share: a small byte-level tokenizer and a prompt list with
repeats (engines prefill each distinct prompt once)."""

from __future__ import annotations

import pytest

from lmforge.tokenizer import save_tokenizer, train_bpe


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return save_tokenizer(train_bpe(["def f(x): return x + 1\n\n" * 20] * 5, 270, ["<e>", "<p>"], 1),
                          out, bos_token="<e>", eos_token="<e>", pad_token="<p>",
                          extra_special_tokens=[])


def make_prompts(tok, n: int) -> list[list[int]]:
    texts = ["def f(x):", "return", "x + 1", "def", "f(x): return x", "1", "def f", "x"]
    return [[tok.eos_token_id, *tok(texts[i % len(texts)], add_special_tokens=False)["input_ids"]]
            for i in range(n)]
