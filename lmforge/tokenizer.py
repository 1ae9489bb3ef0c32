"""Byte-level BPE tokenizers: train with `tokenizers`, save a directory `AutoTokenizer` loads.

Chat templates and `render -> (ids, loss_mask)` join this module with supervised fine-tuning.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmforge.errors import UserError
from lmforge.io import atomic_write_text, check_local_or_hub

# transformers 5 writes its own class name, which 4.x cannot resolve; this one both know.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


# BPE training time grows with the square of a pre-token's length (a run with no break the
# ByteLevel regex cuts at: 100k x "a" takes 5 s, 200k 22 s, 50 MB does not finish); words of
# real text are far shorter, so runs beyond this are split into pieces of this length
MAX_RUN = 1000


@dataclass
class RunGuard:
    """Splits every run of more than `max_run` non-space (or space) characters into pieces
    the trainer sees as separate texts; `split` counts the runs cut, for the summary."""

    max_run: int = field(default_factory=lambda: MAX_RUN)  # read when a guard is made
    split: int = 0

    def __call__(self, texts: Iterable[str]) -> Iterator[str]:
        long_run = re.compile(rf"\S{{{self.max_run + 1},}}|\s{{{self.max_run + 1},}}")
        for text in texts:
            start = 0
            for m in long_run.finditer(text):
                self.split += 1
                for cut in range(m.start() + self.max_run, m.end(), self.max_run):
                    yield text[start:cut]
                    start = cut
            yield text[start:]


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str],
    min_frequency: int = 2,
    guard: RunGuard | None = None,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style: every byte is a token, so nothing is ever unknown).

    Pathologically long runs are split first (`guard`, see MAX_RUN). The trainer (Rust,
    without the GIL) runs in a worker thread while this thread waits in short slices, so
    Ctrl-C and SIGTERM land at once instead of when training ends; the abandoned worker is
    a daemon and dies with the process."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    guarded = (guard if guard is not None else RunGuard())(texts)
    _interruptible(lambda: tok.train_from_iterator(guarded, trainer))
    got = tok.get_vocab_size()
    if got < vocab_size:
        raise UserError(
            f"vocab_size={vocab_size} cannot be filled: the corpus yields only {got} tokens "
            f"at min_frequency={min_frequency}; lower tokenizer.vocab_size or add text"
        )
    return tok


def _interruptible(fn: Callable[[], object]) -> None:
    """Run `fn` in a daemon thread; this thread stays free to take signals. The worker's
    exception, if any, is raised here."""
    failure: list[BaseException] = []

    def work() -> None:
        try:
            fn()
        except BaseException as e:  # handed to the caller's thread below
            failure.append(e)

    worker = threading.Thread(target=work, name="bpe-trainer", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if failure:
        raise failure[0]


def save_tokenizer(
    tok: Tokenizer,
    out: Path,
    *,
    bos_token: str,
    eos_token: str,
    pad_token: str,
    extra_special_tokens: list[str],
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        additional_special_tokens=extra_special_tokens,
        model_max_length=model_max_length,
    )
    save_portable(fast, out)
    return fast


def save_portable(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """`save_pretrained` plus `make_portable`: every tokenizer lmforge writes goes through here."""
    tokenizer.save_pretrained(out)
    make_portable(out)


def make_portable(tok_dir: Path) -> None:
    """Rewrite a saved tokenizer_config.json so transformers 4.4x-4.5x and 5.x (and vLLM,
    lm-eval, which embed one of them) all load the same tokenizer:
    - a class both resolve (5.x writes `TokenizersBackend`, unknown to 4.x);
    - the chat template inline as well: 5.x writes only chat_template.jinja, which older 4.x
      (4.46 among them) never reads; 5.x prefers the file when both exist, and both hold the
      same text;
    - extra special tokens as `additional_special_tokens`: 5.x writes a list under
      `extra_special_tokens`, a key 4.47-4.57 require to be a dict (they crash on a list) and
      4.46 ignores; 5.x reads the old key back into the same list."""
    cfg_path = tok_dir / "tokenizer_config.json"
    if not cfg_path.exists():
        return
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    template = _saved_templates(tok_dir)
    if template is not None:
        cfg["chat_template"] = template
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        if extra and not cfg.get("additional_special_tokens"):
            cfg["additional_special_tokens"] = extra
        del cfg["extra_special_tokens"]
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _saved_templates(tok_dir: Path) -> str | list[dict[str, str]] | None:
    """The chat template(s) 5.x saved as files, in the form 4.x reads from tokenizer_config:
    one string, or (named templates in chat_templates/) a list of {name, template}."""
    default = tok_dir / "chat_template.jinja"
    named = sorted((tok_dir / "chat_templates").glob("*.jinja"))
    if not named:
        return default.read_text(encoding="utf-8") if default.is_file() else None
    out = [{"name": "default", "template": default.read_text(encoding="utf-8")}] if default.is_file() else []
    return out + [{"name": f.stem, "template": f.read_text(encoding="utf-8")} for f in named]


def resolve_tokenizer_dir(path: Path) -> Path:
    """Accept a tokenizer dir or a tokenizer stage dir (whose `final/` holds it)."""
    for cand in (path, path / "final"):
        if (cand / "tokenizer.json").exists() or (cand / "tokenizer_config.json").exists():
            return cand
    raise UserError(f"no tokenizer found at {path} (expected tokenizer.json there or in final/)")


def load_tokenizer(path: Path | str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    p = Path(path)
    check_local_or_hub(path, "tokenizer" if p.name != "final" else "model")
    target = str(resolve_tokenizer_dir(p)) if p.exists() else str(path)
    try:
        return AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {target!r}: {str(e).splitlines()[0]}") from None


def bytes_per_token(tok: Tokenizer, texts: Iterable[str], batch: int = 256) -> tuple[float, int, int]:
    """UTF-8 bytes per token over `texts`: (ratio, bytes, tokens). Compression is the
    tokenizer's one number that transfers across vocab sizes."""
    n_bytes = n_tokens = 0
    for chunk in batched(texts, batch):
        n_bytes += sum(len(t.encode("utf-8")) for t in chunk)
        n_tokens += sum(len(e.ids) for e in tok.encode_batch(chunk, add_special_tokens=False))
    return (n_bytes / max(n_tokens, 1), n_bytes, n_tokens)


def batched(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    """Lists of up to `n` texts (itertools.batched is 3.12+)."""
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
