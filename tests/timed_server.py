"""An OpenAI-compatible server with known timing, to check what a benchmark client measures.

Every streamed request gets its first token ``--ttft-ms`` after the server read it, then one token
every ``--itl-ms``, each aimed at its own deadline on one clock (a late wake-up never shifts the
tokens after it). ``--itl-ms 0`` sends as fast as the client takes them (a client's capacity).

One thread reads requests (a selector; a connection costs no thread), one thread sends every due
token, sleeping on a condition variable: its wake-ups are accurate to tens of microseconds, where
asyncio's epoll timeouts round up to whole milliseconds. Keep-alive is honoured, as the load
generators' connection pools expect. ``GET /stats`` says how late the server itself sent its
pieces (a loaded machine shows there, not in the client). Prints ``PORT <n>`` once it listens.

    python tests/timed_server.py --ttft-ms 40 --itl-ms 10 [--port 0]

Real servers' quirks, each on request (as met on `transformers serve`, issue 18): ``--strict``
refuses ``ignore_eos``/``min_tokens`` with HTTP 422 as a pydantic model with extra="forbid" does;
``--tokens-per-chunk N`` bundles N tokens in each chunk; ``--no-text`` streams tokens that decode to
nothing (empty text) while usage counts them.

Workload checks (issue 18): ``--slow-every K --slow-ms MS`` adds MS to the TTFT of every request
whose prompt (a chat's last message) starts with a number divisible by K (the bench's prompts start
with their index: which requests are slow is known in advance, whichever worker answers);
``--prefill-ms-per-token MS`` adds MS per prompt word to the TTFT (a longer context, a later first
token); ``--prefix-cache`` charges that per-word cost only for the words after the longest start a
prompt shares with one seen before (a prefix cache, per worker process: run it with ``--workers 1``);
``--log FILE`` appends each completion request's body to FILE as one JSON line.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time

MODEL = "timed-test-model"
WORD = " tok"   # one word, one token in any word-level or BPE count


class Scheduler(threading.Thread):
    """Sends (deadline, connection, bytes) in deadline order, each at its time."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.queue: list = []
        self.order = itertools.count()
        self.ready = threading.Condition()
        # How late each timed piece left: tells a slow server from a bad client.
        self.late: list[float] = []
        self.sent: list[float] = []   # when each timed piece left: a capacity run's rate

    def add(self, items: list[tuple[float, socket.socket, bytes, bool]]) -> None:
        with self.ready:
            for deadline, conn, data, close in items:
                heapq.heappush(self.queue, (deadline, next(self.order), conn, data, close))
            self.ready.notify()

    def run(self) -> None:
        while True:
            with self.ready:
                while not self.queue or self.queue[0][0] > time.perf_counter():
                    self.ready.wait(None if not self.queue else self.queue[0][0] - time.perf_counter())
                now = time.perf_counter()
                due = []   # everything due now, taken under one lock: a burst leaves back to back
                while self.queue and self.queue[0][0] <= now:
                    due.append(heapq.heappop(self.queue))
            for deadline, _, conn, data, close in due:
                try:
                    conn.sendall(data)
                    if deadline:
                        now = time.perf_counter()
                        self.late.append(now - deadline)
                        self.sent.append(now)
                    if close:
                        conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _chunk(data: bytes) -> bytes:
    return b"%X\r\n%s\r\n" % (len(data), data)


def _event(payload: dict) -> bytes:
    return _chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")


def _response(status: int, payload: dict, close: bool) -> bytes:
    data = json.dumps(payload).encode()
    reason = {200: "OK", 404: "Not Found", 400: "Bad Request"}.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\nServer: timed-test-server/1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
            ).encode() + data


def _choice(chat: bool, text: str, finish: str | None) -> dict:
    if chat:
        return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return {"index": 0, "text": text, "finish_reason": finish}


def _prompt_words(body: dict) -> list[str]:
    prompt = body.get("prompt")
    if prompt is None:
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages") or [])
    return str(prompt).split()


def _prompt_tokens(body: dict) -> int:
    return max(1, len(_prompt_words(body)))


def _shared(words: list[str], earlier: list[str]) -> int:
    """How many words two prompts share from their start."""
    count = 0
    for mine, theirs in zip(words, earlier, strict=False):
        if mine != theirs:
            break
        count += 1
    return count


def _slow(body: dict, every: int) -> bool:
    """Whether the prompt (a chat's last message) starts with a number divisible by ``every``."""
    if body.get("prompt") is not None:
        text = str(body["prompt"])
    else:
        text = str(((body.get("messages") or [{}])[-1]).get("content", ""))
    first = text.split(maxsplit=1)[0] if text.split() else ""
    return first.isdigit() and int(first) % every == 0


def answer(method: str, path: str, body: dict, received: float, ttft: float, itl: float, close: bool,
           late: list[float], sent: list[float] | None = None, quirks: dict | None = None
           ) -> list[tuple[float, bytes]]:
    """What to send for one request, each piece with its deadline."""
    path = path.split("?", 1)[0]
    quirks = quirks or {}
    if method == "GET" and path == "/stats":
        ordered = sorted(late)
        figures = {"pieces": len(ordered)}
        if sent and len(sent) > 100:
            # With ITL 0 the socket buffers fill at the server's pace first and drain at the client's
            # after the last send; between 40 % and 90 % of the pieces, the server sends only as
            # fast as the client reads: that is the client's rate.
            low, high = int(len(sent) * 0.4), int(len(sent) * 0.9)
            figures["steady_tokens_per_s"] = (high - low) / (sent[high] - sent[low])
        if ordered:
            figures |= {"late_p50_ms": 1000 * ordered[len(ordered) // 2],
                        "late_p99_ms": 1000 * ordered[int(len(ordered) * 0.99)]}
        return [(0, _response(200, figures, close))]
    if method == "GET":
        if path == "/v1/models":
            return [(0, _response(200, {"object": "list", "data": [
                {"id": MODEL, "object": "model", "created": 0, "owned_by": "timed-test-server"}]}, close))]
        if path == "/book.txt":  # a corpus for load generators that build prompts from a book
            text = ("It was a cold day and the light over the water went out when we came home. "
                    * 4000).encode()
            return [(0, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                     % (len(text), b"Connection: close\r\n" if close else b"", text))]
        if path in ("/health", "/version"):
            return [(0, _response(200, {"version": "timed-test-server/1"}, close))]
        return [(0, _response(404, {"error": {"message": f"no route {path}", "code": 404}}, close))]
    if path not in ("/v1/completions", "/v1/chat/completions"):
        return [(0, _response(404, {"error": {"message": f"no route {path}", "code": 404}}, close))]
    chat = path.endswith("chat/completions")
    extra = [name for name in ("ignore_eos", "min_tokens") if name in body]
    if quirks.get("strict") and extra:  # the shape of a pydantic v2 extra="forbid" refusal
        return [(0, _response(422, {"detail": [
            {"type": "extra_forbidden", "loc": ["body", name], "msg": "Extra inputs are not permitted",
             "input": body[name]} for name in extra]}, close))]
    tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
    prompt_tokens = _prompt_tokens(body)
    if quirks.get("log"):
        # One write of one line with O_APPEND: the workers' lines never interleave.
        handle = os.open(quirks["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(handle, (json.dumps({"path": path, "body": body}) + "\n").encode())
        finally:
            os.close(handle)
    computed = prompt_tokens
    seen = quirks.get("prefix_cache")
    if seen is not None:
        words = _prompt_words(body)
        computed = len(words) - max((_shared(words, earlier) for earlier in seen), default=0)
        seen.append(words)
    ttft += computed * float(quirks.get("prefill_ms_per_token") or 0) / 1000
    if quirks.get("slow_every") and _slow(body, int(quirks["slow_every"])):
        ttft += float(quirks.get("slow_ms") or 0) / 1000
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
             "total_tokens": prompt_tokens + tokens}
    base = {"id": "cmpl-timed", "created": int(time.time()), "model": body.get("model") or MODEL,
            "object": "chat.completion.chunk" if chat else "text_completion"}
    if not body.get("stream"):
        text = WORD * tokens
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                  if chat else {"index": 0, "text": text, "finish_reason": "length"})
        whole = {**base, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                 "usage": usage}
        return [(received + ttft + (tokens - 1) * itl, _response(200, whole, close))]
    head = (b"HTTP/1.1 200 OK\r\nServer: timed-test-server/1\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n"
            + (b"Connection: close\r\n" if close else b"") + b"\r\n")
    if chat:
        head += _event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
    pieces = [(0.0, head)]
    per_chunk = int(quirks.get("tokens_per_chunk") or 1)
    word = "" if quirks.get("no_text") else WORD
    chunks = -(-tokens // per_chunk)
    for index in range(chunks):
        last = index == chunks - 1
        text = word * (tokens - index * per_chunk if last else per_chunk)
        data = _event({**base, "choices": [_choice(chat, text, "length" if last else None)]})
        if last:
            if (body.get("stream_options") or {}).get("include_usage"):
                data += _event({**base, "choices": [], "usage": usage})
            data += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        # A chunk of N tokens leaves when its last token is ready: one token every ITL.
        pieces.append((received + ttft + (index * per_chunk + min(per_chunk, tokens - index * per_chunk) - 1)
                       * itl, data))
    return pieces


# Linux stamps each received packet in the kernel when asked (SO_TIMESTAMPING, software receive
# stamps): a request counts from when its bytes reached this machine's network stack, however long
# this process took to be scheduled and read them. Elsewhere: from when the poll found them.
SO_TIMESTAMPING = 37
RX_SOFTWARE_STAMPS = (1 << 3) | (1 << 4)   # SOF_TIMESTAMPING_RX_SOFTWARE | SOF_TIMESTAMPING_SOFTWARE


def _stamp_arrivals(sock: socket.socket) -> None:
    if sys.platform.startswith("linux"):
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, RX_SOFTWARE_STAMPS)
        except OSError:
            pass


def _arrival(ancillary: list, polled: float) -> float:
    """The kernel's receive stamp (wall clock) moved onto perf_counter's clock, else ``polled``."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPING and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            if seconds:
                return seconds + nanoseconds / 1e9 - (time.time() - time.perf_counter())
    return polled


def serve(listener: socket.socket, ttft: float, itl: float, quirks: dict | None = None) -> None:
    scheduler = Scheduler()
    scheduler.start()
    selector = selectors.DefaultSelector()
    listener.setblocking(False)
    _stamp_arrivals(listener)
    selector.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytes] = {}

    def read(conn: socket.socket, polled: float, flags: int = 0) -> None:
        try:
            data, ancillary, _, _ = conn.recvmsg(65536, 256, flags)
        except BlockingIOError:
            return
        except OSError:
            data, ancillary = b"", []
        arrived = _arrival(ancillary, polled)
        if not data:
            selector.unregister(conn)
            buffers.pop(conn, None)
            conn.close()
            return
        buffers[conn] += data
        while True:
            raw = buffers[conn]
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = raw[:end].decode("latin-1").split("\r\n")
            headers = {name.strip().lower(): value.strip()
                       for name, _, value in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length") or 0)
            if len(raw) < end + 4 + length:
                return
            body_bytes, buffers[conn] = raw[end + 4:end + 4 + length], raw[end + 4 + length:]
            method, path = lines[0].split()[:2]
            close = headers.get("connection", "").lower() == "close"
            try:
                body = json.loads(body_bytes or b"{}")
            except ValueError:
                body = {}
            pieces = answer(method, path, body, arrived, ttft, itl, close, scheduler.late, scheduler.sent,
                            quirks)
            scheduler.add([(deadline, conn, data, close and i == len(pieces) - 1)
                           for i, (deadline, data) in enumerate(pieces)])

    while True:
        ready = selector.select()
        # Without kernel stamps a request counts as received when the poll found its bytes waiting,
        # not when this loop got round to it.
        polled = time.perf_counter()
        for key, _ in ready:
            if key.fileobj is not listener:
                read(key.fileobj, polled)
                continue
            # Every waiting connection at once, and its request with it: in a burst, the request
            # bytes are in the kernel before the connection is accepted.
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.setblocking(True)
                # Little room between server and client, so that a fast server waits on the client.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                _stamp_arrivals(conn)
                # Nagle's algorithm would hold a small token back until the last one is acknowledged.
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                selector.register(conn, selectors.EVENT_READ)
                buffers[conn] = b""
                read(conn, polled, socket.MSG_DONTWAIT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float, required=True)
    parser.add_argument("--itl-ms", type=float, required=True)
    parser.add_argument("--workers", type=int, default=2,
                        help="processes sharing the listening socket (default 2): a burst of 64 requests "
                             "is read and answered in parallel, each process with its own GIL")
    parser.add_argument("--strict", action="store_true", help="refuse ignore_eos/min_tokens with HTTP 422")
    parser.add_argument("--tokens-per-chunk", type=int, default=1, help="tokens bundled in each chunk")
    parser.add_argument("--no-text", action="store_true",
                        help="tokens that decode to no text (usage counts them)")
    parser.add_argument("--slow-every", type=int, default=0,
                        help="slow down requests whose prompt starts with a number divisible by this")
    parser.add_argument("--slow-ms", type=float, default=0.0, help="how much later their first token comes")
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.0,
                        help="TTFT grows by this per prompt word")
    parser.add_argument("--prefix-cache", action="store_true",
                        help="charge --prefill-ms-per-token only for words after a start seen before")
    parser.add_argument("--log", default="", help="append every completion request's body to this file")
    args = parser.parse_args(argv)
    quirks = {"strict": args.strict, "tokens_per_chunk": args.tokens_per_chunk, "no_text": args.no_text,
              "slow_every": args.slow_every, "slow_ms": args.slow_ms,
              "prefill_ms_per_token": args.prefill_ms_per_token, "log": args.log,
              "prefix_cache": [] if args.prefix_cache else None}
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET  # --host ::1 too
    listener = socket.create_server((args.host, args.port), family=family, backlog=1024)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)
    # A terminated parent takes its workers with it.
    signal.signal(signal.SIGTERM, lambda *_: (_stop(children), os._exit(0)))
    try:
        serve(listener, args.ttft_ms / 1000, args.itl_ms / 1000, quirks)
    except KeyboardInterrupt:
        _stop(children)


def _stop(children: list[int]) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(main())
