"""`lmforge chat`: the streamed reply is the greedy generation, /reset forgets, trimming keeps
the system prompt and the newest turn and fits the context, multi-byte characters are never
split, and the CLI exits 0 at end of input, 130 on Ctrl-C, 2 on a missing checkpoint."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

from lmforge.chat import install_format, prompt_ids, resolve_format
from lmforge.chat_repl import ChatSession, repl, stream_text
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.generate import generate_batch
from lmforge.rl.rollout import SamplingCfg
from tests.conftest import PAD_ID, micro_llama

SYSTEM = "Be brief."


@pytest.fixture
def chat_model(chat_tok):
    install_format(chat_tok, resolve_format(chat_tok, "lmforge"))
    return micro_llama(vocab=len(chat_tok)).eval(), chat_tok


def talk(session: ChatSession, lines: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = repl(session, io.StringIO(lines), out, err)
    return code, out.getvalue(), err.getvalue()


def test_streamed_greedy_reply_equals_generation(chat_model) -> None:
    model, tok = chat_model
    session = ChatSession(model, tok, SamplingCfg(max_new_tokens=12, temperature=0), SYSTEM)
    code, out, _ = talk(session, "Add 2 and 3.\n")
    assert code == 0
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Add 2 and 3."}]
    ids = prompt_ids(tok, msgs)
    assert session.last_prompt == ids  # the model's own template, system prompt first
    # reference: HF's generate on the same prompt, no cache shared with the streaming loop
    ref = generate_batch(model, [ids], session.stop_ids, PAD_ID, 12)[0]
    assert ref, "a reply of zero tokens would make this comparison empty"
    assert out == tok.decode(ref, skip_special_tokens=True) + "\n"
    assert session.turns[-1] == {"role": "assistant", "content": out[:-1]}


def test_reset_renders_a_fresh_conversation(chat_model) -> None:
    model, tok = chat_model
    cfg = SamplingCfg(max_new_tokens=4, temperature=0)
    session = ChatSession(model, tok, cfg, SYSTEM)
    talk(session, "Add 2 and 3.\nNow 4?\n/reset\nBe brief.\n")
    fresh = ChatSession(model, tok, cfg, SYSTEM)
    talk(fresh, "Be brief.\n")
    assert session.last_prompt == fresh.last_prompt
    assert len(session.turns) == 2  # the question after /reset and its answer


def test_trimming_keeps_system_and_newest_turn_and_fits(chat_model) -> None:
    model, tok = chat_model
    cfg = SamplingCfg(max_new_tokens=8, temperature=0)
    session = ChatSession(model, tok, cfg, SYSTEM)
    # a long history: without trimming, 8 exchanges overflow the 64-token context many times
    history = [{"role": r, "content": f"Add {i} and 3." if r == "user" else f"def add{i}(a):"}
               for i in range(8) for r in ("user", "assistant")]
    session.turns = list(history)
    code, _, err = talk(session, "Now 4?\n")
    assert code == 0 and "dropped the oldest" in err
    prompt = session.last_prompt
    assert len(prompt) + cfg.max_new_tokens <= session.context
    kept = session.turns[:-1]  # what the prompt was rendered from (before the reply joined)
    assert kept[-1] == {"role": "user", "content": "Now 4?"} and len(kept) >= 3
    assert kept[:-1] == history[len(history) - len(kept) + 1:]  # the newest whole exchanges
    assert prompt == prompt_ids(tok, session.messages(kept))  # system prompt included
    # the most history that fits: the newest exchange it dropped would not have
    cut = len(history) - (len(kept) - 1)
    older = history[cut - 2:cut]
    assert len(prompt_ids(tok, session.messages([*older, *kept]))) > session.room


def test_a_message_longer_than_the_context_is_refused_and_the_chat_goes_on(chat_model) -> None:
    model, tok = chat_model
    session = ChatSession(model, tok, SamplingCfg(max_new_tokens=8, temperature=0), SYSTEM)
    code, out, err = talk(session, "Add 2 and 3. " * 40 + "\nNow 4?\n")
    assert code == 0 and "message too long" in err
    assert [t["content"] for t in session.turns[::2]] == ["Now 4?"]


def test_commands_and_exit(chat_model) -> None:
    model, tok = chat_model
    session = ChatSession(model, tok, SamplingCfg(max_new_tokens=2, temperature=0))
    code, out, err = talk(session, "/nope\n\n/exit\nAdd 2 and 3.\n")
    assert code == 0 and out == "" and "unknown command /nope" in err
    assert session.turns == []  # nothing after /exit was read


def test_stream_text_never_splits_a_character(chat_tok) -> None:
    text = "héllo ✓ 你好 🙂 done"  # 2-, 3- and 4-byte characters the BPE never merged
    ids = chat_tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the multi-byte characters span several tokens
    chunks = list(stream_text(chat_tok, iter(ids)))
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)


def test_no_template_and_no_room_are_user_errors(chat_tok) -> None:
    model = micro_llama(vocab=len(chat_tok)).eval()
    chat_tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        ChatSession(model, chat_tok, SamplingCfg(temperature=0))
    install_format(chat_tok, resolve_format(chat_tok, "lmforge"))
    with pytest.raises(UserError, match="no room"):
        ChatSession(model, chat_tok, SamplingCfg(max_new_tokens=64, temperature=0))


@pytest.fixture
def checkpoint(chat_model, tmp_path: Path) -> Path:
    model, tok = chat_model
    model.save_pretrained(tmp_path / "final")
    tok.save_pretrained(tmp_path / "final")
    return tmp_path / "final"


def test_cli_reads_to_end_of_input(checkpoint, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Add 2 and 3.\n"))
    assert main(["chat", str(checkpoint), "--system", SYSTEM, "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_cli_ctrl_c_exits_130(checkpoint, monkeypatch, capsys) -> None:
    class CtrlC(io.StringIO):
        def readline(self, *a: object) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", CtrlC())
    assert main(["chat", str(checkpoint)]) == 130


def test_cli_missing_checkpoint_and_bad_settings_exit_2(checkpoint, tmp_path: Path,
                                                         capsys) -> None:
    assert main(["chat", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    assert main(["chat", str(checkpoint), "--top-p", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "top_p" in err


def test_sampled_chat_is_seeded(chat_model) -> None:
    model, tok = chat_model
    cfg = SamplingCfg(max_new_tokens=8, temperature=1.0, top_p=0.9)
    a = talk(ChatSession(model, tok, cfg, seed=3), "Add 2 and 3.\n")[1]
    b = talk(ChatSession(model, tok, cfg, seed=3), "Add 2 and 3.\n")[1]
    assert a == b
    torch.manual_seed(0)  # the global generator is not what draws: same answer after reseeding
    assert talk(ChatSession(model, tok, cfg, seed=3), "Add 2 and 3.\n")[1] == a
