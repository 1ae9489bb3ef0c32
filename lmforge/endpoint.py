"""An OpenAI-compatible server (vLLM, `lmforge serve`, a hosted API) as a model to ask: chat
completions over the standard library's HTTP client, every failure one line that names the
server.

`check()` asks `GET /v1/models` before any work starts, so a server that refuses connections,
a wrong URL or key, or a model the server does not serve is said at once rather than after an
hour of local generation. Some gateways do not list models (404): reaching them is enough.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from lmforge.errors import UserError

Message = dict[str, str]
T = TypeVar("T")
R = TypeVar("R")


def api_base(url: str) -> str:
    """`http://h:p`, `http://h:p/`, `http://h:p/v1` and `http://h:p/v1/chat/completions` all
    mean the API at `http://h:p/v1`: OpenAI-compatible servers mount it under /v1, and people
    paste the base URL with or without it."""
    base = url.rstrip("/").removesuffix("/chat/completions")
    return base if base.endswith("/v1") else base + "/v1"


def chat_completions_url(url: str) -> str:
    return api_base(url) + "/chat/completions"


def is_endpoint(spec: str | None) -> bool:
    """An http(s) URL names a server; anything else a local model."""
    return bool(spec) and str(spec).startswith(("http://", "https://"))


def one_line(text: str, limit: int | None = 200) -> str:
    """Whitespace runs (newlines too) as one space; cut to `limit` characters with '...'."""
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def _http_error_text(e: urllib.error.HTTPError) -> str:
    """The server's own error message when it sent OpenAI's {"error": {"message": ...}}."""
    try:
        raw = e.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        err = json.loads(raw)["error"]
        raw = err["message"] if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        pass
    return one_line(raw or str(e.reason))


def _network_error_text(e: OSError, timeout: float) -> str:
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, ConnectionRefusedError):
        return "refused the connection"
    if isinstance(reason, socket.gaierror):
        return f"is unreachable: unknown host ({one_line(str(reason))})"
    if isinstance(reason, TimeoutError):
        return f"did not answer within {timeout:g}s"
    return f"is unreachable: {one_line(str(reason))}"


@dataclass(frozen=True)
class Choice:
    text: str
    cut: bool  # stopped by the token limit (finish_reason "length"), not by the model


class Endpoint:
    """One model at an OpenAI-compatible server. `what` starts every error ("judge endpoint",
    "writer endpoint"). `api_key` defaults to $OPENAI_API_KEY; without one no Authorization
    header is sent (local vLLM and `lmforge serve` need none)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None,
                 timeout: float = 60, what: str = "endpoint") -> None:
        self.url, self.model, self.timeout, self.what = url, model, timeout, what
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    def check(self) -> None:
        """The server answers and serves `model` (when it lists its models)."""
        try:
            listing = self._request("GET", api_base(self.url) + "/models", None)
        except _NotFound:
            return  # a gateway without the listing route: it answered, that is enough
        try:
            served = [m["id"] for m in listing["data"]]
        except (KeyError, TypeError):
            return  # an unusual listing is not worth refusing a working server over
        if served and self.model not in served:
            raise UserError(f"{self.what} {self.url} does not serve model {self.model!r}; it "
                            f"serves: {', '.join(map(str, served[:10]))}")

    def chat(self, messages: list[Message], **params: Any) -> list[Choice]:
        """The choices of one chat completion (`n` of them when params ask for n)."""
        body = {"model": self.model, "messages": messages, **params}
        reply = self._request("POST", chat_completions_url(self.url), body)
        try:
            choices = reply["choices"]
            out = [(c["message"]["content"], c.get("finish_reason")) for c in choices]
        except (KeyError, IndexError, TypeError) as e:
            raise UserError(f"{self.what} {self.url} sent a malformed chat completion "
                            f"({type(e).__name__}): {one_line(json.dumps(reply))}") from None
        if not out:
            raise UserError(f"{self.what} {self.url} sent a chat completion without choices")
        for content, _ in out:
            if content is not None and not isinstance(content, str):
                raise UserError(f"{self.what} {self.url} sent a malformed chat completion: "
                                f"message content is {type(content).__name__}, not text")
        # null content (e.g. a refusal field instead) reads as an empty reply
        return [Choice(content or "", reason == "length") for content, reason in out]

    def _request(self, method: str, url: str, body: dict[str, Any] | None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if method == "GET" and e.code == 404:
                raise _NotFound() from None
            raise UserError(f"{self.what} {self.url} answered HTTP {e.code} to {method} "
                            f"{url}: {_http_error_text(e)}") from None
        except OSError as e:  # URLError included: refused, unknown host, timeout, reset
            raise UserError(f"{self.what} {self.url} {_network_error_text(e, self.timeout)}"
                            ) from None
        except http.client.HTTPException as e:  # not HTTP at all, or cut off mid-reply
            raise UserError(f"{self.what} {self.url} sent a broken HTTP response "
                            f"({type(e).__name__})") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise UserError(f"{self.what} {self.url} sent a malformed reply to {method} {url} "
                            f"(not JSON): {one_line(raw.decode('utf-8', 'replace'))}") from None


class _NotFound(Exception):
    pass


def in_threads(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """`fn` over `items`, `workers` requests in flight, results in input order. One failure
    (a dead host) would fail them all: the rest are not waited on."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
