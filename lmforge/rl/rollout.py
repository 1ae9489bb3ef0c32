"""The rollout engine: batched sampling that returns what online RL trains on.

A rollout is kept as token ids from the first sampled token on; its text is decoded for the
reward functions, never tokenized back (a decode/encode round trip is not the identity for
byte-level BPE, and a policy gradient on tokens the policy did not sample is wrong). Each
rollout carries the sampling policy's log-prob of every token it drew, and a mask.

The log-probs are those of softmax(logits / temperature), the distribution the trainer's
forward scores with the same temperature, so the two agree up to float rounding (tested to
1e-5 in fp32). top-k and top-p shape what is drawn but not the reported log-probs, as in TRL
and verl: keep them off (the defaults) where the ratio matters.

Backends: `hf` samples with the policy itself through a KV cache (this file); `vllm` drives a
colocated vLLM engine and receives the policy's weights after each optimizer step
(`lmforge.rl.vllm_engine`). Both take a `torch.Generator` seeded by the caller, so the
rollouts of a step are a function of (seed, step, weights): a resumed run redraws them exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from lmforge.errors import UserError
from lmforge.generate import check_sampling

Backend = Literal["hf", "vllm", "unsloth"]
# transformers 5 renames the cache argument; the old name is the one every version >= 4.45
# (the supported range) accepts, so it stays, without a warning per sampled token
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
Finish = Literal["eos", "stop", "length"]
# Called once per decode step with the batch indices of the rows still sampling, the token each
# drew and the fp32 logits it was drawn from, (b, V); returns the indices that end now (finish
# "stop"). The server streams tokens and applies per-request limits through it.
StepHook = Callable[[list[int], list[int], torch.Tensor], set[int]]


@dataclass(frozen=True)
class SamplingCfg:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy (log-probs then of the T=1 distribution)
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # a row also ends once its text contains one of these
    batch_size: int = 64  # rows sampled together (hf: one KV cache)

    def check(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Rollouts:
    """N sampled completions, right-padded to the longest. `tokens`, `logps`, `mask`: (N, L);
    mask is 1 on every sampled token (the one that ended the row included: the policy is
    trained to emit its stop). `texts`: the decoded completions cut before a stop string."""

    prompts: list[list[int]]
    tokens: torch.Tensor  # (N, L) long
    logps: torch.Tensor  # (N, L) float32, 0 where mask is 0
    mask: torch.Tensor  # (N, L) long
    texts: list[str]
    finish: list[Finish]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)  # (N,)

    def completion(self, i: int) -> list[int]:
        return self.tokens[i, : int(self.mask[i].sum())].tolist()

    def rows(self, idx: Sequence[int]) -> Rollouts:
        ix = torch.tensor(list(idx), dtype=torch.long)
        return Rollouts([self.prompts[i] for i in idx], self.tokens[ix], self.logps[ix],
                        self.mask[ix], [self.texts[i] for i in idx], [self.finish[i] for i in idx])

    @staticmethod
    def cat(parts: Sequence[Rollouts], pad_id: int) -> Rollouts:
        L = max((p.tokens.size(1) for p in parts), default=0)

        def padded(t: torch.Tensor, value: float) -> torch.Tensor:
            return F.pad(t, (0, L - t.size(1)), value=value)

        return Rollouts([q for p in parts for q in p.prompts],
                        torch.cat([padded(p.tokens, pad_id) for p in parts]),
                        torch.cat([padded(p.logps, 0.0) for p in parts]),
                        torch.cat([padded(p.mask, 0) for p in parts]),
                        [t for p in parts for t in p.texts], [f for p in parts for f in p.finish])


class Engine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], cfg: SamplingCfg,
                 generator: torch.Generator) -> Rollouts: ...

    def sync(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""


class StopText:
    """Whether a row's text has reached a stop string, looking only at its newest tokens:
    an occurrence that ends in the newest token lies within the last len(stop) tokens, since
    every token decodes to at least one character."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.window = max((len(s) for s in self.stop), default=0) + 1

    def hit(self, ids: list[int]) -> bool:
        if not self.stop:
            return False
        tail = self.tokenizer.decode(ids[-self.window:], skip_special_tokens=False)
        return any(s in tail for s in self.stop)

    def cut(self, text: str) -> str:
        return text[: min((i for s in self.stop if (i := text.find(s)) >= 0), default=len(text))]


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and attention mask with every prompt flush right, so the first sampled
    token of every row is at the same column."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), P), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = torch.tensor(p, dtype=torch.long)
        att[r, P - len(p):] = 1
    return ids, att


def pick(logits: torch.Tensor, cfg: SamplingCfg, generator: torch.Generator
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from fp32 `logits` (B, V); returns (tokens (B,), their log-probs
    under softmax(logits / temperature) (B,))."""
    if cfg.temperature == 0:
        logp = F.log_softmax(logits, dim=-1)
        tok = logits.argmax(-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    scaled = logits / cfg.temperature
    logp = F.log_softmax(scaled, dim=-1)  # (B, V): what is reported
    shaped = scaled
    if cfg.top_k and cfg.top_k < shaped.size(-1):
        kth = shaped.topk(cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        shaped = shaped.masked_fill(shaped < kth, -math.inf)
    if cfg.top_p < 1.0:
        sorted_, order = shaped.sort(dim=-1, descending=True)
        cum = sorted_.softmax(-1).cumsum(-1)
        drop = cum - sorted_.softmax(-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        shaped = shaped.scatter(-1, order, sorted_.masked_fill(drop, -math.inf))
    # inverse-CDF draw: one uniform per row against the cumulative probabilities, ~3x faster
    # than torch.multinomial over a large vocabulary. u is in (0, total], so the first index
    # whose cumulative mass reaches it always has mass > 0 (a cut token is never drawn)
    cdf = shaped.softmax(-1).cumsum(-1)  # (B, V)
    u = (1.0 - torch.rand(cdf.size(0), 1, generator=generator, dtype=cdf.dtype)).to(cdf.device)
    tok = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_(max=cdf.size(-1) - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class HfEngine:
    """Sampling with the policy module itself, batched over a KV cache. Rows that finish are
    dropped from the cache as soon as a quarter of the batch has, so a long straggler is not
    paid for by every finished row."""

    name = "hf"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 stop_ids: Sequence[int], pad_id: int,
                 autocast: Callable[[], AbstractContextManager[object]] = nullcontext) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids, self.pad_id, self.autocast = list(stop_ids), pad_id, autocast

    def sync(self, model: torch.nn.Module) -> None:
        """Nothing to push: this engine samples with the trained module itself."""

    def generate(self, prompts: list[list[int]], cfg: SamplingCfg,
                 generator: torch.Generator, on_step: StepHook | None = None) -> Rollouts:
        cfg.check()
        if any(not p for p in prompts):
            raise UserError("a prompt is empty: sampling needs at least one prompt token")
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [self._batch(prompts[s:s + cfg.batch_size], cfg, generator, on_step, s)
                     for s in range(0, len(prompts), cfg.batch_size)]
        finally:
            self.model.train(was_training)
        return Rollouts.cat(parts, self.pad_id)

    @torch.no_grad()
    def _batch(self, prompts: list[list[int]], cfg: SamplingCfg, generator: torch.Generator,
               on_step: StepHook | None = None, offset: int = 0) -> Rollouts:
        device = next(self.model.parameters()).device
        B, N = len(prompts), cfg.max_new_tokens
        logits, cache, att, pos = self._prefill(prompts, device)
        out_tok = torch.full((B, N), self.pad_id, dtype=torch.long)
        out_logp = torch.zeros((B, N), dtype=torch.float32)
        length = torch.zeros(B, dtype=torch.long)
        finish: list[Finish] = ["length"] * B
        rows = torch.arange(B)  # the batch rows the cache still holds, in cache order
        live = torch.ones(B, dtype=torch.bool)  # per cache row: still sampling
        stops = torch.tensor(self.stop_ids, dtype=torch.long, device=device)
        stop_text = StopText(self.tokenizer, cfg.stop)
        for t in range(N):
            tok, logp = pick(logits.float(), cfg, generator)  # (b,), (b,)
            at = rows[live]
            out_tok[at, t], out_logp[at, t] = tok.cpu()[live], logp.cpu()[live]
            length[at] = t + 1
            done = torch.isin(tok, stops).cpu() & live
            for j in done.nonzero().squeeze(-1).tolist():
                finish[int(rows[j])] = "eos"
            if stop_text.stop:
                for j in (live & ~done).nonzero().squeeze(-1).tolist():
                    if stop_text.hit(out_tok[int(rows[j]), : t + 1].tolist()):
                        finish[int(rows[j])], done[j] = "stop", True
            if on_step is not None:
                idx = live.nonzero().squeeze(-1)
                ended = on_step([offset + int(r) for r in rows[idx]], tok.cpu()[idx].tolist(),
                                logits[idx.to(device)].float())
                for j in idx.tolist():
                    if offset + int(rows[j]) in ended and not done[j]:
                        finish[int(rows[j])], done[j] = "stop", True
            live &= ~done
            if not live.any() or t == N - 1:
                break
            if live.sum() <= 0.75 * rows.numel():  # compact: drop finished rows from the cache
                keep = live.nonzero().squeeze(-1)
                kd = keep.to(device)
                cache.batch_select_indices(kd)
                rows, live, tok, att, pos = rows[keep], live[keep], tok[kd], att[kd], pos[kd]
            att = torch.cat([att, att.new_ones(att.size(0), 1)], dim=1)
            pos = pos[:, -1:] + 1
            with self.autocast():
                logits = self.model(input_ids=tok[:, None], attention_mask=att, position_ids=pos,
                                    past_key_values=cache, use_cache=True).logits[:, -1]
        L = int(length.max())
        mask = (torch.arange(L)[None, :] < length[:, None]).long()  # (B, L)
        toks = out_tok[:, :L].masked_fill(mask == 0, self.pad_id)
        texts = [stop_text.cut(self.tokenizer.decode(toks[r, : int(length[r])].tolist(),
                                                     skip_special_tokens=True)) for r in range(B)]
        return Rollouts(list(prompts), toks, out_logp[:, :L] * mask, mask, texts, finish)

    def _prefill(self, prompts: list[list[int]], device: torch.device
                 ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """Each distinct prompt once through the model, then its cache rows repeated for its
        copies: GRPO samples G completions per prompt, and the prompt's forward is the same for
        all G (a prompt of ~60 tokens costs about what 60 sampled tokens cost)."""
        uniq: dict[tuple[int, ...], int] = {}
        rep = torch.tensor([uniq.setdefault(tuple(p), len(uniq)) for p in prompts], device=device)
        ids, att = (t.to(device) for t in left_pad([list(k) for k in uniq], self.pad_id))
        pos = (att.cumsum(-1) - 1).clamp(min=0)  # (U, P): every prompt's first token at 0
        cache = DynamicCache()
        with self.autocast():
            logits = self.model(input_ids=ids, attention_mask=att, position_ids=pos,
                                past_key_values=cache, use_cache=True).logits[:, -1]
        if len(uniq) < len(prompts):
            cache.batch_select_indices(rep)
        return logits[rep], cache, att[rep], pos[rep]


def make_engine(backend: Backend, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                stop_ids: Sequence[int], pad_id: int,
                autocast: Callable[[], AbstractContextManager[object]] = nullcontext,
                vllm_args: dict[str, object] | None = None) -> Engine:
    """The engine a config names. vllm is an extra (`make vllm`); unsloth is the vLLM engine
    that Unsloth started inside `model` (unsloth_engine.py)."""
    if backend == "hf":
        return HfEngine(model, tokenizer, stop_ids, pad_id, autocast)
    if backend == "unsloth":
        from lmforge.rl.unsloth_engine import UnslothVllmEngine

        return UnslothVllmEngine(model, tokenizer, stop_ids, pad_id)
    from lmforge.rl.vllm_engine import VllmEngine

    return VllmEngine(model, tokenizer, stop_ids, pad_id, **(vllm_args or {}))


def teacher_forced_logps(model: PreTrainedModel, ro: Rollouts, temperature: float,
                         pad_id: int) -> torch.Tensor:
    """(N, L) log-probs of the rollouts' tokens by a plain forward over prompt + completion,
    left-padded as the engine batched them: the reference the engine's log-probs are tested
    and benchmarked against."""
    seqs = [p + ro.completion(i) for i, p in enumerate(ro.prompts)]
    ids, att = left_pad(seqs, pad_id)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device),
                       position_ids=pos.to(device)).logits.float().cpu()  # (N, S, V)
    out = torch.zeros_like(ro.logps)
    S = ids.size(1)
    for i in range(len(seqs)):
        n = int(ro.mask[i].sum())
        lg = logits[i, S - n - 1: S - 1] / (temperature or 1.0)  # positions predicting them
        out[i, :n] = F.log_softmax(lg, -1).gather(-1, ro.tokens[i, :n, None]).squeeze(-1)
    return out
