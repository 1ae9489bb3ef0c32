"""`lmforge chat CKPT`: a terminal chat with a checkpoint, in the chat template it was trained
with (saved in its tokenizer files by `lmforge sft`), the reply streamed as it is sampled.

Sampling reuses the rollout engine's `pick` (temperature, top-p), one token at a time over a
KV cache: the batched engine returns whole rollouts, and a person wants the first words now.
Stop ids and the context length come from the evaluation `Generator`, so chat, eval and
`generate --chat` stop at the same tokens.

History that no longer fits (rendered prompt + max_new_tokens > the model's context) loses its
oldest user/assistant pairs, for good, with a line on stderr; the system prompt and the newest
user turn are never dropped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import TextIO

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from lmforge.chat import Message, prompt_ids
from lmforge.errors import UserError
from lmforge.rl.rollout import SamplingCfg, pick

Autocast = Callable[[], AbstractContextManager[object]]
HELP = "/reset clears the conversation (the system prompt stays), /exit leaves (or Ctrl-D)"


def no_template(what: str) -> UserError:
    """No fallback to a builtin template: `lmforge sft` always saves the one it trained with,
    so a checkpoint without one was never chat-tuned, and the role tokens its vocabulary may
    reserve are untrained rows; a fallback would dress noise up as a chat."""
    return UserError(f"{what} has no chat template in its tokenizer files (it was not "
                     "chat-tuned; `lmforge sft` saves one): use `lmforge generate` for a base model")


@torch.no_grad()
def stream_tokens(model: PreTrainedModel, prompt: list[int], cfg: SamplingCfg,
                  stop_ids: Sequence[int], generator: torch.Generator,
                  autocast: Autocast = nullcontext) -> Iterator[int]:
    """Sampled token ids, each yielded as soon as it is drawn; a stop id ends the reply and is
    not yielded. One row, so no padding: positions follow from the cache's length."""
    cfg.check()
    device = next(model.parameters()).device
    cache = DynamicCache()
    step = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, P)
    for _ in range(cfg.max_new_tokens):
        with autocast():
            logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]
        tok, _ = pick(logits.float(), cfg, generator)  # (1,)
        if int(tok) in stop_ids:
            return
        yield int(tok)
        step = tok[:, None].to(device)  # (1, 1)


def stream_text(tokenizer: PreTrainedTokenizerBase, ids: Iterator[int]) -> Iterator[str]:
    """The new suffix of the decoded reply after each token. A character split across byte-level
    tokens decodes to U+FFFD until its last byte arrives, so a tail ending in one is held back.
    The whole reply is decoded each time (not token by token): decoding is not additive over
    tokens for every tokenizer (leading-space rules), and a reply is a few hundred tokens."""
    seen: list[int] = []
    shown = 0
    for i in ids:
        seen.append(i)
        text = tokenizer.decode(seen, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > shown:
            yield text[shown:]
            shown = len(text)
    text = tokenizer.decode(seen, skip_special_tokens=True)  # a reply cut mid-character
    if len(text) > shown:
        yield text[shown:]


class ChatSession:
    """One conversation with one model: the system prompt, the turns so far, the sampler."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 cfg: SamplingCfg, system: str | None = None, seed: int = 0,
                 autocast: Autocast = nullcontext) -> None:
        from lmforge.eval.harness import Generator

        if not getattr(tokenizer, "chat_template", None):
            raise no_template("this model")
        cfg.check()
        gen = Generator(model, tokenizer, chat=True)
        self.model, self.tokenizer, self.cfg, self.autocast = model, tokenizer, cfg, autocast
        self.stop_ids, self.context = gen.stop_ids, gen.context
        self.room = self.context - cfg.max_new_tokens
        if self.room < 1:
            raise UserError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt "
                            f"in the model's {self.context}-token context")
        self.system = system
        self.turns: list[Message] = []  # user, assistant, user, ... (never the system prompt)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_prompt: list[int] = []  # the ids of the latest reply's prompt

    def messages(self, turns: Sequence[Message]) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *turns]

    def reset(self) -> None:
        self.turns = []

    def fit(self, user: str) -> tuple[list[int], int]:
        """The prompt for `user` after the turns so far, and how many old turns were dropped
        to fit it into the context with room for the reply."""
        turns = [*self.turns, {"role": "user", "content": user}]
        dropped = 0
        while True:
            ids = prompt_ids(self.tokenizer, self.messages(turns))
            if len(ids) <= self.room:
                break
            if len(turns) == 1:
                raise UserError(f"message too long: {len(ids)} prompt tokens (system prompt "
                                f"included) and {self.cfg.max_new_tokens} new ones exceed the "
                                f"model's {self.context}-token context; nothing was sent")
            turns, dropped = turns[2:], dropped + 2  # a user turn and its answer
        self.turns = turns
        return ids, dropped

    def reply(self, user: str, out: TextIO, err: TextIO) -> str:
        """Answer `user`, writing the reply to `out` as it is sampled; it joins the history."""
        ids, dropped = self.fit(user)
        if dropped:
            print(f"(dropped the oldest {dropped} turns to fit the {self.context}-token "
                  f"context: {len(ids)} prompt + {self.cfg.max_new_tokens} new tokens)",
                  file=err, flush=True)
        self.last_prompt = ids
        was_training = self.model.training
        self.model.eval()
        parts: list[str] = []
        n = 0

        def counted() -> Iterator[int]:
            nonlocal n
            for tok in stream_tokens(self.model, ids, self.cfg, self.stop_ids, self.generator,
                                     self.autocast):
                n += 1
                yield tok

        try:
            for chunk in stream_text(self.tokenizer, counted()):
                parts.append(chunk)
                out.write(chunk)
                out.flush()
        finally:
            self.model.train(was_training)
        out.write("\n")
        out.flush()
        if n == self.cfg.max_new_tokens:
            print(f"(cut at --max-new-tokens {n})", file=err, flush=True)
        text = "".join(parts)
        self.turns.append({"role": "assistant", "content": text})
        return text


def repl(session: ChatSession, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    """Read a line, answer it, until /exit or end of input (exit 0). Ctrl-C propagates: the
    CLI turns it into exit 130. The `> ` prompt is shown only to a terminal, so piped input
    gives the replies alone."""
    tty = stdin.isatty()
    if tty:
        print(f"chatting with the model's own template; {HELP}", file=err, flush=True)
    while True:
        line = _read(stdin, out, tty)
        if line is None or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=err, flush=True)
        elif text in ("/help", "/?"):
            print(HELP, file=err, flush=True)
        elif text.startswith("/") and " " not in text:
            print(f"unknown command {text}: {HELP}", file=err, flush=True)
        else:
            try:
                session.reply(text, out, err)
            except UserError as e:  # one message too long: say so, keep the conversation
                print(f"error: {e}", file=err, flush=True)


def _read(stdin: TextIO, out: TextIO, tty: bool) -> str | None:
    """One line, or None at end of input. A terminal gets `input()` (line editing)."""
    if tty and stdin is sys.stdin:
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:
            pass
        try:
            return input("> ")
        except EOFError:
            out.write("\n")
            return None
    line = stdin.readline()
    return line if line else None


def chat_cli(ns: argparse.Namespace) -> int:
    from lmforge.eval.harness import Generator
    from lmforge.io import check_local_or_hub
    from lmforge.models import load_model, resolve_model_dir
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.precision import make_precision

    path = resolve_model_dir(ns.model)
    check_local_or_hub(path, "model")
    cfg = SamplingCfg(max_new_tokens=ns.max_new_tokens or 1, temperature=ns.temperature,
                      top_p=ns.top_p)
    cfg.check()  # before the model loads: a typo costs no wait
    tokenizer = load_tokenizer(path)
    if not getattr(tokenizer, "chat_template", None):
        raise no_template(ns.model)  # before the model loads
    model = load_model(path)
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    if ns.max_new_tokens is None:  # a small model's context must still hold a prompt
        context = Generator(model, tokenizer, chat=True).context
        cfg = replace(cfg, max_new_tokens=max(1, min(256, context // 2)))
    precision = make_precision("auto", next(model.parameters()).device.type)
    print(f"chat: {precision.choice.line()}", file=sys.stderr, flush=True)
    session = ChatSession(model, tokenizer, cfg, ns.system, ns.seed, precision.autocast)
    return repl(session, sys.stdin, sys.stdout, sys.stderr)
