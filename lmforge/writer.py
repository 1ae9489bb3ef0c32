"""The model that writes `lmforge synth` data: a local checkpoint or an OpenAI-compatible
endpoint, behind one call.

    writer = Writer(cfg.model, "model")   # WriterCfg
    writer.check()                        # before any work: path exists / endpoint answers
    replies = writer(prompts, n=1, temperature=0.7, top_p=1.0, max_new_tokens=256, seed=0)

A prompt is a string (one user turn) or a conversation (a list of messages ending on a user
turn). A chat model (one whose tokenizer has a template, as `lmforge sft` saves) and an endpoint
get them as chat turns. A base model gets a string as raw text to continue (Self-Instruct's
original setting: a numbered list it extends) and a conversation as a "Human: / Assistant:"
transcript (the format Constitutional AI's paper shows), stopped at the next "Human:".
Every reply says whether the token limit cut it, so a stage can drop half-written text.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from lmforge.config import WriterCfg
from lmforge.endpoint import Choice, Endpoint, Message, in_threads
from lmforge.errors import UserError

Prompt = str | list[Message]
_SPEAKER = {"system": "", "user": "Human: ", "assistant": "Assistant: "}
TRANSCRIPT_STOP = ("\n\nHuman:",)


def transcript(conversation: Sequence[Message]) -> str:
    """A conversation as the text a base model continues, ending on the assistant's cue."""
    turns = [_SPEAKER[m["role"]] + m["content"].strip() for m in conversation]
    return "\n\n".join(turns) + "\n\nAssistant:"


class Writer:
    """`cfg.path` a local model or an http(s) endpoint; `key` names the config field in
    errors ("model", "critic")."""

    def __init__(self, cfg: WriterCfg, key: str) -> None:
        self.cfg, self.key = cfg, key
        self.requests, self.seconds = 0, 0.0  # prompts answered, wall time writing
        self._gen: Any = None
        self._precision: Any = None
        self.endpoint = (Endpoint(str(cfg.path), str(cfg.name),
                                  api_key=os.environ.get(cfg.api_key_env) or None,
                                  timeout=cfg.timeout_s, what=f"{key} endpoint")
                         if cfg.remote else None)

    @property
    def label(self) -> str:
        return f"{self.cfg.name} at {self.cfg.path}" if self.cfg.remote else str(self.cfg.path)

    def check(self) -> None:
        """What can be said before work starts: a missing path, a dead or wrong endpoint."""
        from lmforge.io import check_local_or_hub

        if not self.cfg.path:
            raise UserError(f"{self.key}.path: give the model that writes (a local dir, e.g. "
                            "runs/demo/sft/final, or an OpenAI-compatible URL with "
                            f"{self.key}.name)")
        if self.endpoint is not None:
            self.endpoint.check()
        else:
            check_local_or_hub(self.cfg.path, f"{self.key}.path")

    def load(self) -> None:
        """A local model is loaded once (on the GPU when there is one); an endpoint needs
        nothing."""
        if self.endpoint is not None or self._gen is not None:
            return
        import torch

        from lmforge.eval.harness import Generator
        from lmforge.models import load_model, resolve_model_dir
        from lmforge.tokenizer import load_tokenizer
        from lmforge.train.precision import make_precision

        path = resolve_model_dir(str(self.cfg.path))
        model = load_model(path, self.cfg.trust_remote_code).eval()
        if torch.cuda.is_available():
            model.to("cuda")
        precision = make_precision(self.cfg.precision, next(model.parameters()).device.type)
        print(f"{self.key}: {precision.choice.line()}")
        self._precision = precision
        self._gen = Generator(model, load_tokenizer(path, self.cfg.trust_remote_code))
        if not self._gen.chat:
            print(f"{self.key}: {path} has no chat template: it continues raw text, and "
                  "conversations reach it as a Human/Assistant transcript")

    def __call__(self, prompts: Sequence[Prompt], *, n: int = 1, temperature: float,
                 top_p: float, max_new_tokens: int, seed: int) -> list[list[Choice]]:
        """n replies per prompt, in order."""
        self.load()
        t0 = time.perf_counter()
        out = (self._remote(prompts, n, temperature, top_p, max_new_tokens, seed)
               if self.endpoint is not None
               else self._local(prompts, n, temperature, top_p, max_new_tokens, seed))
        self.seconds += time.perf_counter() - t0
        self.requests += len(prompts)
        return out

    def _local(self, prompts: Sequence[Prompt], n: int, temperature: float, top_p: float,
               max_new_tokens: int, seed: int) -> list[list[Choice]]:
        gen = self._gen
        stop: tuple[str, ...] = ()
        if not gen.chat:
            stop = TRANSCRIPT_STOP if any(not isinstance(p, str) for p in prompts) else ()
            prompts = [p if isinstance(p, str) else transcript(p) for p in prompts]
        with self._precision.autocast():
            return gen.replies(list(prompts), n=n, temperature=temperature, top_p=top_p,
                               max_new_tokens=max_new_tokens, batch_size=self.cfg.batch_size,
                               stop=stop, seed=seed)

    def _remote(self, prompts: Sequence[Prompt], n: int, temperature: float, top_p: float,
                max_new_tokens: int, seed: int) -> list[list[Choice]]:
        assert self.endpoint is not None
        endpoint = self.endpoint

        def ask(job: tuple[int, Prompt]) -> list[Choice]:
            i, p = job
            turns = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            params: dict[str, Any] = {"temperature": temperature, "max_tokens": max_new_tokens,
                                      "seed": seed + i}  # each prompt its own, repeatable
            if top_p < 1:
                params["top_p"] = top_p
            if n > 1:
                params["n"] = n
            choices = endpoint.chat(turns, **params)
            if len(choices) != n:
                raise UserError(f"{self.key} endpoint {self.cfg.path} sent {len(choices)} "
                                f"choices for n={n}")
            return choices

        return in_threads(ask, list(enumerate(prompts)), self.cfg.workers)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.cfg.path), **({"name": self.cfg.name} if self.cfg.remote else {}),
                "requests": self.requests, "seconds": round(self.seconds, 2),
                **({"precision": self._precision.choice.as_dict()} if self._precision else {})}

    def close(self) -> None:
        """Let a local model go, so a second one loaded next does not share memory with it."""
        self._gen = None
