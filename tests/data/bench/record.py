"""Re-record the results the compare and gate tests read: real runs of `invoke bench` against the
stand-in trtllm-serve at 100 tokens/s (twice) and at 50 tokens/s, concurrency 1, 2 and 4.

    python tests/data/bench/record.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1])]

from test_bench import run_standin  # noqa: E402

from trtllm_deploy.measure.bench import report  # noqa: E402
from trtllm_deploy.measure.bench.measure import measure  # noqa: E402
from trtllm_deploy.testbed import artifact as tiny  # noqa: E402


def record(name: str, tokens_per_s: int, work: Path) -> None:
    process, url = run_standin(tiny.make(work / "tiny-bf16-tp1"), work / f"{name}.log", tokens_per_s)
    try:
        result = measure(url, concurrency="1,2,4", input_tokens=16, output_tokens=16, requests=8, warmup=1,
                         repeats=2)
    finally:
        process.terminate()
        process.wait(10)
    report.write(result, work / name)
    shutil.copy(work / name / "result.json", HERE / f"{name}.json")
    print(f"{name}: " + ", ".join(f"c{level['concurrency']} {level['summary']['output_tokens_per_s']} tok/s"
                                  for level in result["levels"]))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        for name, rate in (("standin-100tps", 100), ("standin-100tps-again", 100), ("standin-50tps", 50)):
            record(name, rate, Path(scratch))
