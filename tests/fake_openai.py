"""A scripted OpenAI-compatible server for the synth tests, and the same script played through
a local model's generation path, so both writers meet identical replies.

A brain maps the text a model is shown (for a chat request, its messages' contents joined by
blank lines; for a local model, the decoded prompt) to its reply. The server lists one model,
honours `n`, and cuts a reply longer than `max_tokens` words with finish_reason "length".
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

Brain = Callable[[str], str]
MODEL = "scripted-7b"


class JsonHandler(BaseHTTPRequestHandler):
    """A handler that answers JSON and keeps quiet in the test log."""

    def send_json(self, code: int, body: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """The base URL of `handler` served on an ephemeral loopback port, for the block."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _handler(brain: Brain, seen: list[dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(JsonHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append({"method": "GET", "path": self.path})
            if self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
            else:
                self.send_json(404, {"error": {"message": "no such route"}})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"method": "POST", "path": self.path, "body": body})
            shown = "\n\n".join(m["content"] for m in body["messages"])
            choices = []
            for i in range(body.get("n", 1)):
                words = brain(shown).split(" ")
                cut = len(words) > body["max_tokens"]
                choices.append({"index": i, "finish_reason": "length" if cut else "stop",
                                "message": {"role": "assistant",
                                            "content": " ".join(words[:body["max_tokens"]])}})
            self.send_json(200, {"object": "chat.completion", "model": body["model"],
                                 "choices": choices})

    return Handler


@contextmanager
def scripted_server(brain: Brain) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(base URL, the requests seen) of a server answering with `brain`."""
    seen: list[dict[str, Any]] = []
    with serving(_handler(brain, seen)) as url:
        yield url, seen


def script_local_model(monkeypatch: pytest.MonkeyPatch, brain: Brain) -> None:
    """A local model's sampler replaced by `brain`: each prompt's ids are decoded and the
    reply is encoded back, cut at max_new_tokens ids as generation would cut it."""
    import lmforge.eval.harness as harness

    def fake(model: Any, prompts: list[list[int]], stop_ids: list[int], pad: int,
             max_new_tokens: int, batch_size: int = 64, *, tokenizer: Any = None,
             **kw: Any) -> list[list[int]]:
        out = []
        for ids in prompts:
            reply = brain(tokenizer.decode(ids, skip_special_tokens=True))
            out.append(tokenizer(reply, add_special_tokens=False)["input_ids"][:max_new_tokens])
        return out

    monkeypatch.setattr(harness, "generate_batch", fake)
