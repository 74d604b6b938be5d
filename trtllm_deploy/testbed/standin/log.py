"""Log lines of the stand-in: each one says it comes from a stand-in, and from which rank."""

from __future__ import annotations

import sys
import threading

LEVELS = {"error": 40, "warning": 30, "info": 20, "debug": 10}

# trtllm-serve's --log_level choices (tensorrt_llm.logger.severity_map) on the four levels used here.
TRTLLM_LEVELS = {
    "internal_error": "error", "error": "error", "warning": "warning", "info": "info",
    "verbose": "debug", "debug": "debug", "trace": "debug",
}


class Log:
    """``[TensorRT-LLM stand-in][rank 0][INFO] message``; errors go to stderr, the rest to stdout."""

    def __init__(self, product: str = "TensorRT-LLM", rank: int = 0, level: str = "info") -> None:
        self.product = product
        self.rank = rank
        self.threshold = LEVELS[level]
        self._lock = threading.Lock()

    def _emit(self, level: str, message: str) -> None:
        if LEVELS[level] < self.threshold:
            return
        stream = sys.stderr if level == "error" else sys.stdout
        prefix = f"[{self.product} stand-in][rank {self.rank}][{level.upper()}] "
        text = "".join(prefix + line + "\n" for line in (message.splitlines() or [""]))
        with self._lock:
            stream.write(text)
            stream.flush()

    def error(self, message: str) -> None:
        self._emit("error", message)

    def warning(self, message: str) -> None:
        self._emit("warning", message)

    def info(self, message: str) -> None:
        self._emit("info", message)

    def debug(self, message: str) -> None:
        self._emit("debug", message)
