"""Workload shapes beyond random prompts: a shared prefix, multi-turn conversations, and a user's own
prompts from a JSONL file (``--prompts FILE``).

- prefix: every prompt starts with the same ``--prefix-tokens`` P tokens; the rest is unique to it
  (it starts with the request's number). A server with prefix caching computes those P tokens once;
  TTFT shows what that saves.
- multi-turn: conversations of ``--turns`` T turns on /v1/chat/completions. Each turn sends the
  whole history: every earlier user message and the server's own answers to them, then a new user
  message of --input-tokens. A conversation's turns run one after another; conversations run side
  by side, as many at once as the concurrency.
- --prompts: one JSON object a line, ``{"prompt": "..."}`` or ``{"messages": [{"role": "user",
  "content": "..."}, ...]}``, with an optional ``"output_tokens": N``; requests take the lines in
  turn (wrapping round). A file with messages is sent to /v1/chat/completions.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import time
from pathlib import Path

from trtllm_deploy.errors import InputError

from .client import Endpoint, Sample, stream
from .workload import Prompts, Workload

KINDS = ("random", "prefix", "multi-turn", "depth")
# The shared prefix: words that no unique part starts with (those start with a number).
PREFIX_WORDS = ("you are a helpful assistant who answers every question about the weather and the sea "
                "in short plain words for people who read them on a small screen").split()


class PrefixPrompts(Prompts):
    """Prompt *i*: the same ``prefix_tokens`` tokens for every prompt, then one of ``Prompts``'
    unique prompts for the rest of ``input_tokens``."""

    def __init__(self, input_tokens: int, prefix_tokens: int, tokenizer_dir: Path | None = None,
                 given: bool = False) -> None:
        super().__init__(input_tokens, tokenizer_dir, given)
        if not 0 < prefix_tokens < input_tokens:
            raise InputError(f"--prefix-tokens {prefix_tokens}: give a shared prefix of at least 1 token and "
                             f"fewer than --input-tokens ({input_tokens}), so that every prompt has a "
                             "part of its own")
        self.prefix_tokens = prefix_tokens
        words = [PREFIX_WORDS[k % len(PREFIX_WORDS)] for k in range(prefix_tokens)]
        self.prefix = " ".join(words)
        if self.tokenizer is not None:
            ids = self.tokenizer.encode(self.prefix, add_special_tokens=False).ids
            while len(ids) < prefix_tokens:
                self.prefix += " " + PREFIX_WORDS[len(ids) % len(PREFIX_WORDS)]
                ids = self.tokenizer.encode(self.prefix, add_special_tokens=False).ids
            self.prefix = self.tokenizer.decode(ids[:prefix_tokens])
        self.rest = copy.copy(self)
        self.rest.__class__ = Prompts
        self.rest.input_tokens = input_tokens - prefix_tokens

    def __call__(self, index: int) -> str:
        return f"{self.prefix} {self.rest(index)}"


class FilePrompts:
    """The lines of a user's JSONL file, checked as a whole before anything is sent."""

    EXPECTED = ('one JSON object a line: {"prompt": "text"} or {"messages": [{"role": "user", '
                '"content": "text"}]}, optionally with "output_tokens": N')

    def __init__(self, path: str) -> None:
        self.path = Path(path).expanduser()
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"--prompts {path}: cannot read it ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise InputError(f"--prompts {path}: not UTF-8 text; expected {self.EXPECTED}") from None
        self.lines = [self._line(number, line) for number, line in enumerate(text.splitlines(), 1)
                      if line.strip()]
        if not self.lines:
            raise InputError(f"{self.path}: no prompts in it; expected {self.EXPECTED}")
        self.chat = any("messages" in line for line in self.lines)
        self.counted_by = f"the prompts of {self.path} ({len(self.lines)}, lengths as written)"

    def _line(self, number: int, line: str) -> dict:
        where = f"{self.path}:{number}"
        try:
            given = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg}); expected {self.EXPECTED}") from None
        if not isinstance(given, dict):
            raise InputError(f"{where}: a JSON {type(given).__name__}, not an object; "
                             f"expected {self.EXPECTED}")
        unknown = sorted(set(given) - {"prompt", "messages", "output_tokens"})
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {self.EXPECTED}")
        if ("prompt" in given) == ("messages" in given):
            raise InputError(f"{where}: give \"prompt\" or \"messages\", one of them; "
                             f"expected {self.EXPECTED}")
        if "prompt" in given and not (isinstance(given["prompt"], str) and given["prompt"].strip()):
            raise InputError(f"{where}: \"prompt\" must be non-empty text; expected {self.EXPECTED}")
        if "messages" in given:
            messages = given["messages"]
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in messages):
                raise InputError(f"{where}: \"messages\" must be a non-empty list of "
                                 f"{{\"role\": ..., \"content\": ...}} objects with text values; "
                                 f"expected {self.EXPECTED}")
        tokens = given.get("output_tokens")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise InputError(f"{where}: \"output_tokens\" {tokens!r} must be a whole number of at least 1; "
                             f"expected {self.EXPECTED}")
        return given

    def __call__(self, index: int) -> dict:
        return self.lines[index % len(self.lines)]


async def run_conversations(endpoint: Endpoint, workload: Workload, prompts: Prompts, concurrency: int,
                            requests: int, seconds: float, timeout_s: float, first_index: int = 0
                            ) -> tuple[list[Sample], float]:
    """Closed-loop conversations: each of ``concurrency`` streams takes the next conversation and
    sends its turns one after another, each carrying the history with the server's real answers.
    ``requests`` is rounded up to whole conversations; with ``seconds``, no conversation starts
    after them (those under way finish)."""
    turns = int(workload.shape.get("turns") or 1)
    conversations = math.ceil(requests / turns) if requests else 0
    samples: list[Sample] = []
    started_conversations = 0
    started = time.perf_counter()
    stop_at = started + seconds if seconds else math.inf

    async def one_stream() -> None:
        nonlocal started_conversations
        while (started_conversations < conversations if conversations else time.perf_counter() < stop_at):
            number = started_conversations
            started_conversations += 1
            messages: list[dict] = []
            for turn in range(1, turns + 1):
                index = first_index + number * turns + turn - 1
                messages.append({"role": "user", "content": prompts(index)})
                sample = await stream(endpoint, workload.path, workload.body({"messages": list(messages)}),
                                      timeout_s, keep_text=True)
                sample.turn = turn
                samples.append(sample)
                if sample.error is not None:
                    break  # the history is broken: the conversation ends here
                messages.append({"role": "assistant", "content": "".join(sample.text)})
                sample.text = None

    await asyncio.gather(*(one_stream() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def by_turn(samples: list[Sample]) -> list[dict]:
    """Per turn index of a multi-turn run: requests, and TTFT and end-to-end p50 (ms): how a longer
    history slows the first token."""
    from .stats import percentile

    turns: dict[int, list[Sample]] = {}
    for sample in samples:
        if sample.turn is not None:
            turns.setdefault(sample.turn, []).append(sample)
    rows = []
    for turn, group in sorted(turns.items()):
        good = [s for s in group if s.error is None]
        ttft = [s.ttft for s in good if s.ttft is not None]
        e2e = [s.e2e for s in good if s.e2e is not None]
        rows.append({"turn": turn, "requests": len(group), "succeeded": len(good),
                     "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 3) if ttft else None,
                     "e2e_p50_ms": round(percentile(e2e, 50) * 1000, 3) if e2e else None})
    return rows


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InputError(f"--workload {kind!r}: give one of {', '.join(KINDS)}")
    return kind

