"""Chat templates and rendering a conversation into (ids, loss_mask).

The template is a jinja string stored on the tokenizer (`tokenizer.chat_template`), so the one
used in training is saved with the checkpoint's tokenizer files, where transformers, vLLM's
OpenAI server and lm-evaluation-harness read it: train and inference cannot disagree. It is
saved twice, as chat_template.jinja (transformers 5) and inside tokenizer_config.json (4.x reads
only that): see `tokenizer.make_portable`.

Which tokens the loss sees comes from the template itself: everything an assistant says sits
inside `{% generation %}...{% endgeneration %}` (transformers' marker for
`return_assistant_tokens_mask`), end-of-turn token included, because a model that never learns
to emit it never stops. A template without the marker cannot say what to train on, so it is an
error unless `train_on_prompt` makes the question moot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from lmforge.errors import UserError

Message = dict[str, str]

_CHATML = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if m['role'] == 'assistant' -%}"
    "{% generation %}{{ m['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else -%}{{ m['content'] + '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

# Stanford Alpaca's prompt; the system message (if any) replaces its preamble.
_ALPACA = (
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}"
    "{%- else -%}{{ 'Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\\n\\n' }}{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
    "{%- else -%}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{%- endif -%}{%- endfor -%}"
)

# No markup at all: turns separated by newlines, each answer ended by end-of-text. Closest to
# what a base model saw in pretraining (documents separated by end-of-text).
_PLAIN = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
    "{%- else -%}{{ m['content'] + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

# The role tokens lmforge's tokenizer stage reserves (<|system|>, <|user|>, <|assistant|>, <|end|>).
_LMFORGE = (
    "{%- for m in messages -%}"
    "{{ '<|' + m['role'] + '|>\\n' }}"
    "{%- if m['role'] == 'assistant' -%}"
    "{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ m['content'] + '<|end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Builtin:
    template: str
    special_tokens: tuple[str, ...]  # must be single tokens in the vocabulary
    end_of_turn: str | None  # generation stops here (None: the tokenizer's eos)


BUILTINS: dict[str, Builtin] = {
    "chatml": Builtin(_CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "llama3": Builtin(_LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                      "<|eot_id|>"),
    "alpaca": Builtin(_ALPACA, (), None),
    "plain": Builtin(_PLAIN, (), None),
    "lmforge": Builtin(_LMFORGE, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>"),
}

_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class ChatFormat:
    name: str  # a builtin's name, "tokenizer" (its own), or a .jinja path
    template: str
    special_tokens: tuple[str, ...]
    end_of_turn: str | None


def has_generation_marker(template: str) -> bool:
    return bool(_GENERATION.search(template))


def resolve_format(tokenizer: PreTrainedTokenizerBase, name: str) -> ChatFormat:
    """`auto`: the tokenizer's own template if it has one; else `lmforge` when the tokenizer
    carries lmforge's role tokens; else `chatml`. A builtin name or a path to a .jinja file
    picks one explicitly."""
    own = getattr(tokenizer, "chat_template", None)
    if name == "auto":
        if isinstance(own, str) and own:
            name = "tokenizer"
        else:
            vocab = tokenizer.get_vocab()
            name = "lmforge" if all(t in vocab for t in BUILTINS["lmforge"].special_tokens) else "chatml"
    if name == "tokenizer":
        if not isinstance(own, str) or not own:
            raise UserError("data.template=tokenizer: the tokenizer has no chat template; "
                            f"pick one of {', '.join(BUILTINS)}")
        return ChatFormat("tokenizer", own, (), _guess_end_of_turn(own, tokenizer))
    if name in BUILTINS:
        b = BUILTINS[name]
        return ChatFormat(name, b.template, b.special_tokens, b.end_of_turn)
    path = Path(name)
    if path.suffix in (".jinja", ".j2") or path.exists():
        if not path.is_file():
            raise UserError(f"data.template: file {path} not found")
        text = path.read_text(encoding="utf-8")
        return ChatFormat(str(path), text, (), _guess_end_of_turn(text, tokenizer))
    raise UserError(f"data.template={name!r}: expected auto, tokenizer, a .jinja file or one of "
                    f"{', '.join(BUILTINS)}")


def _guess_end_of_turn(template: str, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token closing an assistant turn, if the template names one we know."""
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if tok in template and tok in tokenizer.get_vocab():
            return tok
    return None


def install_format(tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat) -> list[str]:
    """Put the template on the tokenizer (it is saved with it) and add any of its special
    tokens the vocabulary lacks. Returns the added tokens: the model must grow to fit them."""
    missing = [t for t in fmt.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.chat_template = fmt.template
    return missing


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn token and eos."""
    ids = []
    if fmt.end_of_turn is not None:
        ids.append(tokenizer.convert_tokens_to_ids(fmt.end_of_turn))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


@dataclass(frozen=True)
class Rendered:
    ids: list[int]
    loss_mask: list[int]  # 1 on tokens the loss is taken on (as targets)


def render(tokenizer: PreTrainedTokenizerBase, conversations: list[list[Message]],
           train_on_prompt: bool = False) -> list[Rendered]:
    """Render and tokenize conversations with the tokenizer's chat template. The mask marks
    assistant tokens (every assistant turn, its end-of-turn token included), or every token
    when `train_on_prompt`."""
    template = tokenizer.chat_template
    if not train_on_prompt and not has_generation_marker(template or ""):
        raise UserError("chat template has no {% generation %} marker, so the assistant's "
                        "tokens cannot be told from the prompt's; add the marker around "
                        "assistant content or set data.train_on_prompt=true")
    if not conversations:
        return []
    out: Any = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=True, add_generation_prompt=False,
        return_assistant_tokens_mask=not train_on_prompt,
    )
    ids_list = out["input_ids"]
    if train_on_prompt:
        return [Rendered(list(ids), [1] * len(ids)) for ids in ids_list]
    return [Rendered(list(ids), list(mask)) for ids, mask in zip(ids_list, out["assistant_masks"])]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, conversation: list[Message]) -> list[int]:
    """The tokens a model is given to answer: every turn so far plus the assistant header."""
    out: Any = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                             add_generation_prompt=True)
    return list(out["input_ids"])


def mark_loss_tokens(tokenizer: PreTrainedTokenizerBase, r: Rendered) -> str:
    """A rendered example as text with the loss-bearing spans in [[...]], for --preview."""
    parts: list[str] = []
    run: list[int] = []
    state = r.loss_mask[0] if r.loss_mask else 0
    for tok, m in zip([*r.ids, -1], [*r.loss_mask, -1]):
        if m != state:
            text = tokenizer.decode(run, skip_special_tokens=False)
            parts.append(f"[[{text}]]" if state == 1 else text)
            run, state = [], m
        run.append(tok)
    return "".join(parts)
