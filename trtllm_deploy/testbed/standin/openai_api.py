"""The OpenAI-compatible HTTP surface that rank 0 serves, with the shapes the real servers use.

``GET /health``, ``GET /v1/models``, ``GET /metrics`` (the iteration stats since the last call, as
trtllm-serve returns them), ``POST /v1/completions`` and ``POST /v1/chat/completions``, streamed as
server-sent events (``data: {...}`` ... ``data: [DONE]``) or not. Requests are parsed here and handed
to the engine; the HTTP threads never talk MPI.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .engine import Engine, Generation, count_prompt_tokens
from .log import Log

DEFAULT_MAX_TOKENS = 16
# ``GET /metrics`` of the runtimes whose answer is not trtllm-serve's iteration stats: their module
# registers program name → (engine, served model) → (content type, body).
METRICS: dict = {}
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """A request the server refuses with 400 and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Ask:
    """What a completion or chat request asks the engine for."""

    prompt: str
    max_tokens: int
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ServedModel:
    name: str  # the id clients put in "model"
    runtime: str  # the program serving it ("trtllm-serve", ...)
    max_seq_len: int | None
    metadata: dict

    @property
    def label(self) -> str:
        """The "model" of every response: the served name, marked as a stand-in."""
        return f"{self.name} (stand-in)"


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def parse_completion(body: object, model: ServedModel) -> Ask:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string (or a list of exactly one string)", "prompt")
    return _ask(body, prompt, body.get("max_tokens"), model)


def parse_chat(body: object, model: ServedModel) -> Ask:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    lines = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"messages[{index}] needs a 'role' of {', '.join(ROLES)}", "messages")
        lines.append(f"{message['role']}: {_content_text(message.get('content'), index)}")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return _ask(body, "\n".join(lines), limit, model)


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _content_text(content: object, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts", "messages")


def _ask(body: dict, prompt: str, limit: object, model: ServedModel) -> Ask:
    if limit is None:
        limit = DEFAULT_MAX_TOKENS
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise RequestError("'max_tokens' must be an integer of at least 1", "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise RequestError("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), bool)):
        raise RequestError("'stream_options' must be an object with a boolean 'include_usage'",
                           "stream_options")
    if body.get("n", 1) != 1:
        raise RequestError("the stand-in generates one choice per request ('n' must be 1)", "n")
    for name in ("temperature", "top_p"):  # accepted and ignored: output is deterministic
        value = body.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise RequestError(f"'{name}' must be a number", name)
    if model.max_seq_len and count_prompt_tokens(prompt) + limit > model.max_seq_len:
        raise RequestError(f"prompt ({count_prompt_tokens(prompt)} tokens) plus max_tokens ({limit}) "
                           f"exceeds max_seq_len ({model.max_seq_len})", "max_tokens")
    return Ask(prompt, limit, stream, bool((options or {}).get("include_usage", False)))


def usage(ask: Ask, generated: int) -> dict:
    prompt_tokens = count_prompt_tokens(ask.prompt)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated}


class Reply:
    """The OpenAI objects for one request: whole responses and streamed chunks."""

    def __init__(self, chat: bool, model: ServedModel, ask: Ask) -> None:
        self.chat = chat
        self.ask = ask
        self.base = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                     "created": int(time.time()), "model": model.label}

    def whole(self, words: list[str], finish: str) -> dict:
        text = "".join(" " + w for w in words)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self.base, "object": "chat.completion" if self.chat else "text_completion",
                "choices": [choice], "usage": usage(self.ask, len(words))}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self.base, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "choices": [choice]}

    def usage_chunk(self, generated: int) -> dict:
        return {**self.base, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "choices": [], "usage": usage(self.ask, generated)}


def make_server(host: str, port: int, model: ServedModel, engine: Engine, log: Log) -> ThreadingHTTPServer:
    """Bind ``host:port`` (raises OSError) and return the server, not yet serving."""

    class Handler(_Handler):
        pass

    Handler.model, Handler.engine, Handler.log = model, engine, log
    # An IPv6 host ("::" listens on both families, as the uvicorn servers of the real runtimes do).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = type("Server", (ThreadingHTTPServer,), {"address_family": family})((host, port), Handler)
    server.daemon_threads = True
    return server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "trtllm-deploy-standin"
    model: ServedModel
    engine: Engine
    log: Log
    POST_ROUTES = ("/v1/completions", "/v1/chat/completions")

    def log_message(self, format: str, *args) -> None:
        self.log.info(f"{self.client_address[0]}:{self.client_address[1]} - {format % args}")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200 if self.engine.alive else 503, None)
        elif path == "/v1/models":
            entry = {"id": self.model.name, "object": "model", "created": int(time.time()),
                     "owned_by": "trtllm-deploy stand-in (not a real runtime)", "standin": True,
                     "runtime": self.model.runtime, "root": self.model.metadata.get("path"),
                     "max_model_len": self.model.max_seq_len, "metadata": self.model.metadata}
            self._send(200, {"object": "list", "data": [entry]})
        elif path == "/metrics" and self.model.runtime in METRICS:
            self._send_body(*METRICS[self.model.runtime](self.engine, self.model))
        elif path == "/metrics":
            self._send_list(self.engine.take_stats())
        elif path in self.POST_ROUTES:
            self._send(405, error_body(f"{path} takes POST", 405))
        else:
            self._send(404, error_body(f"no route {path}", 404))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in self.POST_ROUTES:
            self._send(404, error_body(f"no route {path}", 404))
            return
        chat = path == "/v1/chat/completions"
        try:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except ValueError as error:
                raise RequestError(f"the request body is not valid JSON ({error})") from None
            ask = (parse_chat if chat else parse_completion)(body, self.model)
        except RequestError as error:
            self._send(400, error_body(str(error), 400, error.param))
            return
        generation = Generation(ask.prompt, ask.max_tokens)
        self.engine.submit(generation)
        reply = Reply(chat, self.model, ask)
        try:
            (self._stream if ask.stream else self._whole)(generation, reply)
        except (BrokenPipeError, ConnectionResetError):
            generation.cancelled = True

    def _whole(self, generation: Generation, reply: Reply) -> None:
        while True:
            kind, value = generation.next_event()
            if kind == "finish":
                self._send(200, reply.whole(generation.words, value))
                return
            if kind == "error":
                self._send(500, error_body(value, 500))
                return

    def _stream(self, generation: Generation, reply: Reply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if reply.chat:
            self._event(reply.chunk(None, first=True))
        while True:
            kind, value = generation.next_event()
            if kind == "token":
                self._event(reply.chunk(" " + value))
            elif kind == "finish":
                self._event(reply.chunk(None, finish=value))
                if reply.ask.include_usage:
                    self._event(reply.usage_chunk(len(generation.words)))
                self._write_chunk(b"data: [DONE]\n\n")
                break
            else:
                self._event(error_body(value, 500))
                break
        self._write_chunk(b"")
        self.close_connection = True

    def _event(self, payload: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send_list(self, items: list) -> None:
        self._send_body("application/json", json.dumps(items).encode())

    def _send_body(self, content_type: str, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send(self, status: int, payload: dict | None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
