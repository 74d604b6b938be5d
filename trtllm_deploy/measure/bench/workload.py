"""What each request asks for: a prompt of a fixed length and a fixed number of output tokens.

Lengths are counted in the model's own tokens when its ``tokenizer.json`` is at hand and the
``tokenizers`` package is installed; otherwise in words, and the result says "approximate".
Every prompt starts differently so that no server can answer from a prefix cache.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trtllm_deploy.errors import InputError

# Plain English words that most tokenizers keep as one token each.
WORDS = ("the time of day we can see a light over the water and then go home to find some bread "
         "for all our friends who were here last year when it was cold").split()


@dataclass(frozen=True)
class Workload:
    input_tokens: int = 128
    output_tokens: int = 128
    chat: bool = False
    ignore_eos: bool = True       # ask for exactly output_tokens: the server must not stop early
    model: str = ""
    counted_by: str = "words (approximate)"
    # The server's refusal when it would not take ignore_eos/min_tokens: sent without them since.
    ignore_eos_refused: str = ""
    # random, prefix, multi-turn, depth or file (--prompts), and what shapes it (prefix_tokens, ...).
    kind: str = "random"
    shape: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def as_json(self) -> dict:
        return asdict(self) | {"path": self.path}

    def body(self, prompt: str | dict) -> dict:
        """The request for one prompt: its text, or (a line of --prompts, a conversation so far) a
        dict with "prompt" or "messages" and optionally its own "output_tokens"."""
        given = prompt if isinstance(prompt, dict) else {"prompt": prompt}
        output_tokens = given.get("output_tokens") or self.output_tokens
        body = {"model": self.model, "max_tokens": output_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0}
        if self.ignore_eos:
            # Every runtime's server takes these; min_tokens keeps one that honours it from stopping early.
            body |= {"ignore_eos": True, "min_tokens": output_tokens}
        if "messages" in given:
            body["messages"] = given["messages"]
        elif self.chat:
            body["messages"] = [{"role": "user", "content": given["prompt"]}]
        else:
            body["prompt"] = given["prompt"]
        return body


class Prompts:
    """Prompt *i* of the run: a number first (so each one differs), then filler words."""

    def __init__(self, input_tokens: int, tokenizer_dir: Path | None = None, given: bool = False) -> None:
        if input_tokens < 1:
            raise InputError("--input-tokens must be at least 1")
        self.input_tokens = input_tokens
        self.tokenizer, missing = _tokenizer(tokenizer_dir)
        if missing and given:  # asked for by the user: not silently replaced by word counts
            raise InputError(f"--tokenizer {tokenizer_dir}: {missing}")
        self.counted_by = ("the model's tokenizer.json" if self.tokenizer else
                           f"words (approximate: {missing or 'no tokenizer given (--tokenizer DIR)'})")

    def longer(self, tokens: int) -> Prompts:
        """The same prompts, ``tokens`` longer (the depth workload's context before each prompt)."""
        longer = copy.copy(self)
        longer.input_tokens = self.input_tokens + tokens
        return longer

    def __call__(self, index: int) -> str:
        words = [str(index)] + [WORDS[(index + k) % len(WORDS)] for k in range(self.input_tokens - 1)]
        text = " ".join(words)
        if self.tokenizer is None:
            return text
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        while len(ids) < self.input_tokens:  # a word may split into several tokens, or merge
            text += " " + WORDS[len(ids) % len(WORDS)]
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.decode(ids[:self.input_tokens])


def _tokenizer(folder: Path | None):
    """The tokenizer in ``folder``, or None and what exactly is missing."""
    if folder is None:
        return None, ""
    path = Path(folder).expanduser()
    path = path if path.name == "tokenizer.json" else path / "tokenizer.json"
    if not path.is_file():
        return None, f"{path} does not exist (give the folder holding the model's tokenizer.json)"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None, ("the Python package `tokenizers` is not installed in this environment "
                      "(pip install --require-hashes -r requirements/host.txt installs it)")
    try:
        return Tokenizer.from_file(str(path)), ""
    except Exception as exc:  # the package's own error type is not exported
        return None, f"{path} is not a tokenizer the `tokenizers` package reads ({exc})"
