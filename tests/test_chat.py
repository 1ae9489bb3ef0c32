"""Chat templates: exact renderings and loss masks per builtin, the markers' contract, and
the template as saved (where transformers 4.x and 5.x each look for it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.chat import (
    BUILTINS,
    install_format,
    mark_loss_tokens,
    prompt_ids,
    render,
    resolve_format,
    stop_token_ids,
)
from lmforge.errors import UserError
from lmforge.tokenizer import load_tokenizer, make_portable, save_portable

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Now 4?"},
    {"role": "assistant", "content": "def f(x):\n    return x"},
]

# (full rendering, the assistant spans the loss sees) per builtin, written out by hand
EXPECTED = {
    "lmforge": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nAdd 2 and 3.<|end|>\n<|assistant|>\n5<|end|>\n"
        "<|user|>\nNow 4?<|end|>\n<|assistant|>\ndef f(x):\n    return x<|end|>\n",
        ["5<|end|>", "def f(x):\n    return x<|end|>"]),
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nNow 4?<|im_end|>\n"
        "<|im_start|>assistant\ndef f(x):\n    return x<|im_end|>\n",
        ["5<|im_end|>", "def f(x):\n    return x<|im_end|>"]),
    "llama3": (
        "<|bos|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 3.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nNow 4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\ndef f(x):\n    return x<|eot_id|>",
        ["5<|eot_id|>", "def f(x):\n    return x<|eot_id|>"]),
    "alpaca": (
        "Be brief.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n5<|endoftext|>\n\n"
        "### Instruction:\nNow 4?\n\n### Response:\ndef f(x):\n    return x<|endoftext|>\n\n",
        ["5<|endoftext|>", "def f(x):\n    return x<|endoftext|>"]),
    "plain": (
        "Be brief.\nAdd 2 and 3.\n5<|endoftext|>Now 4?\ndef f(x):\n    return x<|endoftext|>",
        ["5<|endoftext|>", "def f(x):\n    return x<|endoftext|>"]),
}


def spans(tok, ids: list[int], mask: list[int]) -> list[str]:
    out, run = [], []
    for t, m in zip([*ids, -1], [*mask, 0]):
        if m:
            run.append(t)
        elif run:
            out.append(tok.decode(run, skip_special_tokens=False))
            run = []
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_renders_and_masks_exactly(chat_tok, name: str) -> None:
    fmt = resolve_format(chat_tok, name)
    added = install_format(chat_tok, fmt)
    assert added == [t for t in BUILTINS[name].special_tokens if t not in
                     ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")]
    text, answers = EXPECTED[name]
    r = render(chat_tok, [CONV])[0]
    assert chat_tok.decode(r.ids, skip_special_tokens=False) == text
    assert spans(chat_tok, r.ids, r.loss_mask) == answers  # every assistant turn + its end token
    # the generation prompt is exactly the rendering up to where the first answer starts
    first = r.loss_mask.index(1)
    assert prompt_ids(chat_tok, CONV[:2]) == r.ids[:first]


def test_mask_token_by_token(chat_tok) -> None:
    """The lmforge template's mask, built from its pieces: 0 on prompt, 1 on answers."""
    install_format(chat_tok, resolve_format(chat_tok, "lmforge"))
    enc = lambda s: chat_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pieces = [("<|user|>\nAdd 2 and 3.<|end|>\n<|assistant|>\n", 0), ("5<|end|>", 1), ("\n", 0)]
    ids, mask = [], []
    for s, m in pieces:
        ids += enc(s)
        mask += [m] * len(enc(s))
    r = render(chat_tok, [CONV[1:3]])[0]
    assert (r.ids, r.loss_mask) == (ids, mask)


def test_train_on_prompt_masks_nothing_out(chat_tok) -> None:
    install_format(chat_tok, resolve_format(chat_tok, "chatml"))
    r = render(chat_tok, [CONV], train_on_prompt=True)[0]
    assert r.loss_mask == [1] * len(r.ids)


def test_auto_prefers_the_tokenizers_own_template(chat_tok) -> None:
    assert resolve_format(chat_tok, "auto").name == "lmforge"  # it has lmforge's role tokens
    chat_tok.chat_template = BUILTINS["plain"].template
    fmt = resolve_format(chat_tok, "auto")
    assert fmt.name == "tokenizer" and fmt.template == BUILTINS["plain"].template


def test_template_without_generation_marker_is_an_error(chat_tok, tmp_path: Path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    install_format(chat_tok, resolve_format(chat_tok, str(f)))
    with pytest.raises(UserError, match="no {% generation %} marker"):
        render(chat_tok, [CONV])
    assert render(chat_tok, [CONV], train_on_prompt=True)[0].loss_mask[0] == 1


def test_unknown_template_and_stop_tokens(chat_tok) -> None:
    with pytest.raises(UserError, match="expected auto, tokenizer"):
        resolve_format(chat_tok, "vicuna")
    fmt = resolve_format(chat_tok, "chatml")
    install_format(chat_tok, fmt)
    assert stop_token_ids(chat_tok, fmt) == [chat_tok.convert_tokens_to_ids("<|im_end|>"),
                                            chat_tok.eos_token_id]


def test_preview_marks_loss_tokens(chat_tok) -> None:
    install_format(chat_tok, resolve_format(chat_tok, "lmforge"))
    shown = mark_loss_tokens(chat_tok, render(chat_tok, [CONV[1:3]])[0])
    assert shown == "<|user|>\nAdd 2 and 3.<|end|>\n<|assistant|>\n[[5<|end|>]]\n"


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_saved_template_is_where_both_generations_look(chat_tok, tmp_path: Path, name: str) -> None:
    """5.x reads chat_template.jinja, 4.x (4.46 among them) only tokenizer_config.json's key:
    both hold the installed template, and it reloads to the same rendering."""
    fmt = resolve_format(chat_tok, name)
    install_format(chat_tok, fmt)
    save_portable(chat_tok, tmp_path)
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tc["chat_template"] == (tmp_path / "chat_template.jinja").read_text(encoding="utf-8")
    assert tc["chat_template"] == fmt.template
    back = load_tokenizer(tmp_path)
    assert back.chat_template == fmt.template
    assert render(back, [CONV]) == render(chat_tok, [CONV])
    make_portable(tmp_path)  # idempotent: a second pass changes no byte
    assert json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8")) == tc


def test_named_templates_are_saved_as_4x_reads_them(tmp_path: Path) -> None:
    """Several templates: 5.x writes chat_templates/NAME.jinja; 4.x reads [{name, template}]."""
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend"}')
    (tmp_path / "chat_template.jinja").write_text("D")
    (tmp_path / "chat_templates").mkdir()
    (tmp_path / "chat_templates" / "tool_use.jinja").write_text("T")
    make_portable(tmp_path)
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == [{"name": "default", "template": "D"},
                                   {"name": "tool_use", "template": "T"}]
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
