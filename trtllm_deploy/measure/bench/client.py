"""One streamed completion over raw HTTP/1.1 on asyncio, timed where the bytes arrive.

A token is stamped with the time the event loop's poll found its bytes waiting (``new_loop``'s
selector reads the clock once as each poll returns), not when Python got round to decoding them.
Received bytes are only queued with that time; one parser task decodes them a piece at a time and
lets the loop poll again between pieces, so when 64 streams' tokens land together none of them is
stamped late behind the parsing of the others. No HTTP library sits between the socket and the
clock; that keeps the client both accurate and cheap.
"""

from __future__ import annotations

import asyncio
import collections
import json
import selectors
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from trtllm_deploy.errors import InputError
from trtllm_deploy.urls import host_port, http_url


class _PollClock(selectors.DefaultSelector):
    """The loop's selector, remembering when its last poll returned."""

    polled = 0.0

    def select(self, timeout=None):
        ready = super().select(timeout)
        self.polled = time.perf_counter()
        return ready


def new_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose protocols can read when their data was found waiting."""
    selector = _PollClock()
    loop = asyncio.SelectorEventLoop(selector)
    loop.poll_clock = selector
    return loop


class _Parser:
    """The loop's one parser: decodes queued (stream, time, bytes) in arrival order, yielding to
    the loop after each piece so that its poll, and so the clock, is never more than one piece
    of parsing behind."""

    def __init__(self) -> None:
        self.queue: collections.deque = collections.deque()
        self.task: asyncio.Task | None = None

    def put(self, stream: _Stream, when: float, data: bytes | None, exc=None) -> None:
        self.queue.append((stream, when, data, exc))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        queue = self.queue
        while queue:
            stream, when, data, exc = queue.popleft()
            try:
                if data is None:
                    stream._lost(exc, when)
                else:
                    stream._consume(when, data)
            except Exception as error:  # a malformed response fails its request, not the run
                stream._fail("protocol", f"{type(error).__name__}: {error}")
                stream._lost(None, when)
                stream.transport.close()
            if queue:
                await asyncio.sleep(0)


def _parser() -> _Parser:
    loop = asyncio.get_running_loop()
    parser = getattr(loop, "bench_parser", None)
    if parser is None:
        parser = loop.bench_parser = _Parser()
    return parser


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: ``http://host:port`` and the base path before ``/v1``."""

    host: str
    port: int
    base: str = ""

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise InputError(f"--url {url!r}: give an http://HOST:PORT address of an OpenAI-compatible "
                             "server (https is not supported: benchmark on the serving network)")
        try:
            port = parts.port or 80
        except ValueError:
            raise InputError(f"--url {url!r}: the port is not a number") from None
        base = parts.path.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        return cls(parts.hostname, port, base)

    @property
    def url(self) -> str:
        return http_url(self.host, self.port, self.base)


@dataclass
class Sample:
    """One request as the client saw it; times are ``perf_counter`` seconds."""

    sent: float = 0.0
    responded: float | None = None       # the response's first bytes (its status line)
    first: float | None = None          # first chunk that carried text
    arrivals: list[float] = field(default_factory=list)  # every chunk that carried text
    ended: float | None = None
    output_tokens: int | None = None     # the server's usage count, where it gave one
    error: str | None = None             # the kind of failure, None when it succeeded
    detail: str = ""
    scheduled: float | None = None       # when an open-loop run meant to send it
    text: list[str] | None = None        # the answer's text pieces, kept only when asked (multi-turn)
    turn: int | None = None              # a multi-turn request's turn, from 1

    @property
    def lateness(self) -> float | None:
        """How long after its scheduled time the request left (open-loop runs only)."""
        return None if self.scheduled is None else self.sent - self.scheduled

    @property
    def tokens(self) -> int:
        return self.output_tokens if self.output_tokens is not None else len(self.arrivals)

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.ended is None else self.ended - self.sent

    @property
    def itl(self) -> list[float]:
        times = self.arrivals
        return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first chunk: the time from the first chunk of text to the
        last over the tokens that came after the first chunk. With one token a chunk that is
        (last - first) / (tokens - 1); a server that bundles tokens sends tokens/chunks of them in
        each chunk, the first included. A request whose text came in one chunk has no decode time
        to divide: None, not 0."""
        chunks = len(self.arrivals)
        if self.first is None or chunks < 2 or self.tokens < 2:
            return None
        after_first = self.tokens - self.tokens / chunks
        decode = self.arrivals[-1] - self.first
        return decode / after_first if decode > 0 and after_first > 0 else None


def request_bytes(endpoint: Endpoint, path: str, body: dict) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (f"POST {endpoint.base}{path} HTTP/1.1\r\nHost: {host_port(endpoint.host, endpoint.port)}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    return head.encode() + payload


def _text_of(event: dict) -> str:
    choices = event.get("choices") or ()
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""


class _Stream(asyncio.Protocol):
    """Parses the response as it arrives: status, headers, chunked or plain body, SSE events."""

    def __init__(self, sample: Sample, done: asyncio.Future, request: bytes) -> None:
        self.sample = sample
        self.request = request
        # Outside new_loop() (a plain asyncio.run) the time of the callback is the best there is.
        self.clock = getattr(asyncio.get_running_loop(), "poll_clock", None)
        self.done = done
        self.head = b""
        self.status = 0
        self.chunked = False
        self.streaming = False
        self.body = bytearray()       # transfer-decoded bytes not yet split into events
        self.raw = bytearray()        # chunked bytes not yet decoded
        self.chunk_left = 0           # bytes left in the current chunk (+2 for its CRLF)
        self.finished = False
        self.parser = _parser()

    def connection_made(self, transport) -> None:
        self.transport = transport
        # TTFT starts when the request leaves, not when a connection was asked for: setting up a
        # connection is this client's work (a pooled client has none), not the server's.
        self.sample.sent = time.perf_counter()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = self.clock.polled if self.clock is not None else time.perf_counter()
        self.parser.put(self, now, data)

    def _consume(self, now: float, data: bytes) -> None:
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.sample.responded = now
            self._headers(self.head[:end].decode("latin-1"))
            data, self.head = self.head[end + 4:], b""
        if self.chunked:
            self._dechunk(data)
        else:
            self.body += data
        if self.streaming:
            self._events(now)

    def _headers(self, text: str) -> None:
        lines = text.split("\r\n")
        try:
            self.status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            self._fail("protocol", f"not an HTTP response: {lines[0][:80]!r}")
            self.status = -1
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.streaming = self.status == 200 and "event-stream" in headers.get("content-type", "")

    def _dechunk(self, data: bytes) -> None:
        raw = self.raw
        raw += data
        position = 0
        while True:
            if self.chunk_left:
                take = min(self.chunk_left, len(raw) - position)
                payload_left = self.chunk_left - 2
                if payload_left > 0:
                    self.body += raw[position:position + min(take, payload_left)]
                self.chunk_left -= take
                position += take
                if self.chunk_left:
                    break
            line_end = raw.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(raw[position:line_end].split(b";")[0] or b"0", 16)
            position = line_end + 2
            if size == 0:
                self.finished = True
                break
            self.chunk_left = size + 2
        del raw[:position]

    def _events(self, now: float) -> None:
        body = self.body
        if b"\r" in body:
            body[:] = body.replace(b"\r\n", b"\n")
        start = 0
        sample = self.sample
        while True:
            end = body.find(b"\n\n", start)
            if end < 0:
                break
            for line in bytes(body[start:end]).split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.finished = True
                    continue
                try:
                    event = json.loads(payload)
                except ValueError:
                    self._fail("protocol", f"an event that is not JSON: {payload[:80]!r}")
                    continue
                if "error" in event:
                    self._fail("stream error", str(event["error"])[:200])
                    continue
                piece = _text_of(event)
                if piece:
                    if sample.first is None:
                        sample.first = now
                    sample.arrivals.append(now)
                    if sample.text is not None:
                        sample.text.append(piece)
                usage = event.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    sample.output_tokens = usage["completion_tokens"]
            start = end + 2
        del body[:start]
        if self.finished and not self.done.done():
            sample.ended = sample.arrivals[-1] if sample.arrivals else now
            self.done.set_result(None)
            self.transport.close()

    def _fail(self, kind: str, detail: str) -> None:
        if self.sample.error is None:
            self.sample.error, self.sample.detail = kind, detail

    def connection_lost(self, exc) -> None:
        self.parser.put(self, time.perf_counter(), None, exc)   # after the bytes queued before it

    def _lost(self, exc, when: float) -> None:
        if self.done.done():
            return
        sample = self.sample
        if self.status and not self.streaming and sample.error is None:
            text = bytes(self.body).decode("utf-8", "replace")
            try:
                text = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            kind = f"http {self.status}" if self.status != 200 else "not streamed"
            self._fail(kind, str(text)[:300])
        elif sample.error is None:
            self._fail("connection closed", "the server closed the stream before [DONE]"
                       + (f" ({exc})" if exc else ""))
        sample.ended = when
        self.done.set_result(None)


async def stream(endpoint: Endpoint, path: str, body: dict, timeout: float = 600.0,
                 keep_text: bool = False) -> Sample:
    """Send one streaming request and time every chunk of text (keeping the text with ``keep_text``);
    never raises for a failed request."""
    loop = asyncio.get_running_loop()
    sample = Sample(text=[] if keep_text else None)
    done = loop.create_future()
    request = request_bytes(endpoint, path, body)
    sample.sent = time.perf_counter()
    transport = None
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: _Stream(sample, done, request), endpoint.host, endpoint.port),
            timeout)
        await asyncio.wait_for(done, timeout - (time.perf_counter() - sample.sent))
    except asyncio.TimeoutError:
        sample.error, sample.detail = "timeout", f"no complete answer within {timeout:g} s"
    except OSError as exc:
        sample.error, sample.detail = "connect", f"{type(exc).__name__}: {exc}"
    finally:
        if transport is not None:
            transport.close()
    if sample.ended is None:
        sample.ended = time.perf_counter()
    # Tokens that decode to no visible text yet (a tokenizer's partial characters, special tokens)
    # still count when the server's usage says how many there were; only their times are unknown.
    if sample.error is None and sample.first is None and not sample.output_tokens:
        sample.error, sample.detail = "no tokens", "the stream ended without any text or usage count"
    return sample
