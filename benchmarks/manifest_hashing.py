"""Manifest creation and re-verification on a 4 GiB, 20-file checkpoint, beside ``sha256sum``.

Targets (issue 5): creation at least 2x faster than ``sha256sum`` over the same files; re-verifying
the unchanged tree (cache warm) under 1 s. Every file is read once before timing, so the page cache
is warm for every row alike; each row is the median of ``--repeats`` runs. sha256sum runs as one
process over all files, as a user would run it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from trtllm_deploy.artifact import manifest  # noqa: E402

MiB = 1 << 20
# Like a sharded checkpoint: 4 large shards, 12 medium, and the small files beside them.
SHARDS = [640 * MiB] * 4 + [112 * MiB] * 12 + [16 * MiB, 2 * MiB]
TOTAL = 4096 * MiB


def sizes() -> list[int]:
    listed = SHARDS + [TOTAL - sum(SHARDS) - 4096, 4096]  # a tokenizer-sized file, a config
    assert len(listed) == 20 and sum(listed) == TOTAL
    return listed


def make_tree(root: Path) -> list[Path]:
    paths = []
    for index, size in enumerate(sizes()):
        path = root / (f"model-{index:05d}-of-00018.safetensors" if index < 18 else
                       ("tokenizer.json" if index == 18 else "config.json"))
        with open(path, "wb") as out:
            left = size
            while left:
                block = os.urandom(min(left, 64 * MiB))
                out.write(block)
                left -= len(block)
        paths.append(path)
    return paths


def timed(action, repeats: int) -> tuple[list[float], object]:
    times, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = action()
        times.append(time.perf_counter() - started)
    return times, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to make the tree (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="manifest-bench-", dir=args.dir) as scratch:
        root = Path(scratch)
        paths = make_tree(root)
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)  # warm
        names = [str(p.relative_to(root)) for p in paths]

        def sha256sum():
            subprocess.run(["sha256sum", "--", *names], cwd=root, stdout=subprocess.DEVNULL, check=True)

        def create():
            manifest.write(root, manifest.create(root, {"model": "benchmark"}))

        rows = []
        baseline, _ = timed(sha256sum, args.repeats)
        rows.append(("sha256sum (baseline)", baseline, ""))
        made, _ = timed(create, args.repeats)
        speedup = statistics.median(baseline) / statistics.median(made)
        rows.append(("manifest create", made,
                     f">= 2x faster: {'met' if speedup >= 2 else 'MISSED'} ({speedup:.1f}x)"))
        (root / manifest.CACHE).unlink(missing_ok=True)
        time.sleep(0.05)  # past the clock tick the files were last changed in
        full, report = timed(lambda: manifest.check(root, cache=False), args.repeats)
        rows.append(("verify, no cache", full, "" if report.ok else "FAILED"))
        first = manifest.check(root)  # fills the cache
        assert first.ok and first.hashed == 20, first
        again, report = timed(lambda: manifest.check(root), args.repeats)
        assert report.ok and report.hashed == 0, report
        median = statistics.median(again)
        rows.append(("verify unchanged (cache warm)", again,
                     f"< 1 s: {'met' if median < 1 else 'MISSED'}"))

        def touch_and_verify():
            os.utime(paths[0])  # the largest shard: its stat changed, so it is read again
            report = manifest.check(root)
            assert report.ok and report.hashed == 1, report
            return report

        touched, _ = timed(touch_and_verify, args.repeats)
        rows.append((f"verify after touching one {sizes()[0] // MiB} MiB file", touched, ""))

        cpu = os.cpu_count()
        print(f"manifest hashing: {len(paths)} files, {TOTAL // MiB} MiB, page cache warm, "
              f"{cpu} CPU(s), {args.repeats} runs each; {manifest.ALGORITHM} "
              f"({manifest.CHUNK_BYTES // MiB} MiB chunks)")
        print(f"{'what':40s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'GB/s':>6s}  target")
        for what, times, note in rows:
            med = statistics.median(times)
            rate = f"{TOTAL / med / 1e9:6.2f}" if "unchanged" not in what and "touch" not in what else ""
            print(f"{what:40s} {med:9.3f} {min(times):7.3f} {max(times):7.3f} {rate:>6s}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
