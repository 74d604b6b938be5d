"""``diagnose.gpu``: utilisation, memory, power, clocks and temperature sampled on every node.

Each node runs ``nvidia-smi dmon`` for the requested time (in parallel, over SSH) and its raw output
is kept in a file per node; the summary is mean and max per metric per GPU, and a PNG chart. A
field the GPU does not report reads ``-`` in dmon (GB10's frame-buffer memory: its memory is unified,
see /proc/meminfo) or ``[N/A]`` in ``--query-gpu`` output; both become "not reported", never zero.

Runs without the project's dependencies on a plain GPU host: ``python3 -m trtllm_deploy.measure.diagnose.gpu
--seconds 10 --out DIR`` (the chart only where matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

# dmon's column name → (our name, unit). -s pucm: power/temperature, utilisation, clocks, memory.
DMON_COLUMNS = {
    "pwr": ("power", "W"), "gtemp": ("temperature", "C"), "mtemp": ("memory temperature", "C"),
    "sm": ("sm utilisation", "%"), "mem": ("memory utilisation", "%"),
    "pclk": ("sm clock", "MHz"), "mclk": ("memory clock", "MHz"), "fb": ("memory used", "MB"),
}
# The ones shown in the table and the chart, in order.
SHOWN = ("sm utilisation", "memory utilisation", "memory used", "power", "sm clock", "memory clock",
         "temperature")
CHARTED = ("sm utilisation", "power", "sm clock", "temperature")
NOT_REPORTED = {"-", "N/A", "[N/A]", "[Not Supported]", "Not Supported", "[Unknown Error]"}


def dmon_argv(seconds: float, interval: int) -> list[str]:
    """The sampling command: one line per GPU every ``interval`` seconds, ``seconds`` long."""
    interval = max(1, int(interval))
    count = max(1, math.ceil(seconds / interval))
    return ["nvidia-smi", "dmon", "-s", "pucm", "-o", "DT", "-d", str(interval), "-c", str(count)]


def _number(text: str) -> float | None:
    text = text.strip()
    if text in NOT_REPORTED or not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _seconds_of_day(time: str) -> float | None:
    parts = time.split(":")
    if len(parts) != 3:
        return None
    try:
        hours, minutes, seconds = (float(part) for part in parts)
    except ValueError:
        return None
    return hours * 3600 + minutes * 60 + seconds


def parse_dmon(text: str) -> list[dict]:
    """``nvidia-smi dmon`` output → samples ``{"t": seconds, "gpu": index, metric: value|None}``.

    The header (``#Date Time gpu pwr ...``) may repeat; the units line after it is skipped. Rows of
    another width than the header (a line cut short) are dropped."""
    header: list[str] | None = None
    samples: list[dict] = []
    first: float | None = None
    day = 0.0
    last: float | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            words = line[1:].split()
            if "gpu" in words:
                header = [word.lower() for word in words]
            continue
        words = line.split()
        if not header or len(words) != len(header):
            continue
        row = dict(zip(header, words, strict=True))
        try:
            sample: dict = {"gpu": int(row["gpu"])}
        except ValueError:
            continue
        clock = _seconds_of_day(row["time"]) if "time" in row else None
        if clock is not None:
            if last is not None and clock + day < last:  # past midnight
                day += 86400
            last = clock + day
            first = last if first is None else first
            sample["t"] = last - first
        for column, (name, _unit) in DMON_COLUMNS.items():
            if column in row:
                sample[name] = _number(row[column])
        samples.append(sample)
    if not any("t" in sample for sample in samples):
        gpus = len({sample["gpu"] for sample in samples}) or 1
        for index, sample in enumerate(samples):
            sample["t"] = float(index // gpus)
    return samples


# --query-gpu fields (``-lms`` sampling) → our names.
QUERY_FIELDS = {"utilization.gpu": "sm utilisation", "utilization.memory": "memory utilisation",
                "memory.used": "memory used", "power.draw": "power", "clocks.sm": "sm clock",
                "clocks.mem": "memory clock", "temperature.gpu": "temperature"}


def parse_query(text: str, fields: list[str]) -> list[dict]:
    """``--query-gpu=F1,F2,... --format=csv,noheader,nounits`` rows → samples (``[N/A]`` → None).

    ``timestamp`` (``2026/11/27 12:58:49.863``) becomes seconds from the first row; ``index`` the GPU."""
    samples = []
    first = None
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != len(fields):
            continue
        row = dict(zip(fields, cells, strict=True))
        sample: dict = {"gpu": int(row["index"]) if row.get("index", "").isdigit() else 0}
        if "timestamp" in row:
            clock = _seconds_of_day(row["timestamp"].split()[-1])
            if clock is not None:
                first = clock if first is None else first
                sample["t"] = clock - first
        for field, name in QUERY_FIELDS.items():
            if field in row:
                sample[name] = _number(row[field])
        samples.append(sample)
    return samples


def summarize(samples: list[dict]) -> dict[int, dict[str, dict]]:
    """Per GPU, per metric: mean, max and how many samples reported it (None when none did)."""
    by_gpu: dict[int, dict[str, list[float]]] = {}
    for sample in samples:
        metrics = by_gpu.setdefault(sample["gpu"], {})
        for name in SHOWN:
            if name in sample:
                values = metrics.setdefault(name, [])
                if sample[name] is not None:
                    values.append(sample[name])
    summary: dict[int, dict[str, dict]] = {}
    for gpu, metrics in sorted(by_gpu.items()):
        summary[gpu] = {name: ({"mean": sum(values) / len(values), "max": max(values),
                                "samples": len(values)} if values else None)
                        for name, values in metrics.items()}
    return summary


def chart_figure(samples_by_node: dict[str, list[dict]]):
    """One panel per charted metric, one line per node and GPU: the figure and its legend."""
    from trtllm_deploy.measure.chart import panels_figure

    panel_series = []
    for metric in CHARTED:
        series: dict[str, list] = {}
        for node, samples in samples_by_node.items():
            for sample in samples:
                if metric in sample:
                    series.setdefault(f"{node}/gpu{sample['gpu']}", []).append(
                        (sample["t"], sample[metric]))
        panel_series.append(series)
    return panels_figure(panel_series, titles=[f"{metric}, {UNITS[metric]}" for metric in CHARTED])


def chart(samples_by_node: dict[str, list[dict]]) -> tuple[bytes, dict[str, str]]:
    """``chart_figure`` drawn: the PNG and the legend ``node/gpuN → colour``."""
    from trtllm_deploy.measure.chart import png

    figure, legend = chart_figure(samples_by_node)
    return png(figure), legend


def cell(stats: dict | None, unit: str) -> str:
    if stats is None:
        return "not reported"
    return f"{stats['mean']:.0f} / {stats['max']:.0f} {unit}"


UNITS = {name: unit for name, unit in DMON_COLUMNS.values()}


def write_chart(samples_by_node: dict[str, list[dict]], out: Path) -> dict[str, str] | None:
    if not any(samples_by_node.values()):
        return None
    image, legend = chart(samples_by_node)
    (out / "gpu.png").write_bytes(image)
    return legend


# --- on every node, over SSH --------------------------------------------------------------------

# The sampling step's script: $@ is dmon's command line. Its Script is made where it runs, since
# this module also runs on a plain host without the project's dependencies.
SAMPLE_STEP = "sample the GPUs with nvidia-smi dmon"
SAMPLE_TEXT = ('command -v nvidia-smi >/dev/null 2>&1 || { echo "nvidia-smi is not installed on $(hostname):'
               ' install the NVIDIA driver" >&2; exit 127; }; exec "$@"')


def sample_nodes(cluster, seconds: float, interval: int, out: Path) -> dict:
    """Every node at once: dmon for ``seconds``, its output kept as ``out/<node>.dmon.txt``."""
    from trtllm_deploy.hosts import scripts
    from trtllm_deploy.hosts.fanout import fan_out

    out.mkdir(parents=True, exist_ok=True)
    sample = scripts.Script(SAMPLE_STEP, SAMPLE_TEXT, timeout=seconds + 60)

    def one(node, target) -> list[dict]:
        done = scripts.run(target, sample, *dmon_argv(seconds, interval), check=False)
        (out / f"{node.name}.dmon.txt").write_text(done.result.stdout + done.stderr)
        if not done.ok:
            raise scripts.StepFailed(target.name, sample.step, done.result)
        return parse_dmon(done.stdout)

    seen = fan_out(cluster.nodes, one)
    samples = {o.node.name: o.value for o in seen if o.ok}
    legend = write_chart(samples, out)
    return {"out": str(out), "chart": str(out / "gpu.png") if legend else None, "legend": legend or {},
            "nodes": {name: {str(gpu): stats for gpu, stats in summarize(s).items()}
                      for name, s in samples.items()},
            "failed": {o.node.name: o.reason for o in seen.failed}}


# --- on a plain host: no SSH, no project dependencies -------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Sample this host's GPUs with nvidia-smi dmon.")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--interval", type=int, default=1)
    parser.add_argument("--out", default="gpu-samples")
    args = parser.parse_args(argv)
    if shutil.which("nvidia-smi") is None:
        print("nvidia-smi is not installed: install the NVIDIA driver", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(dmon_argv(args.seconds, args.interval), capture_output=True, text=True,
                          timeout=args.seconds + 60)
    (out / "local.dmon.txt").write_text(done.stdout)
    samples = parse_dmon(done.stdout)
    summary = summarize(samples)
    try:
        legend = write_chart({"local": samples}, out)
    except ImportError:  # a plain host without matplotlib: the samples and summary still stand
        print("matplotlib is not installed: no chart drawn", file=sys.stderr)
        legend = None
    print(json.dumps({"samples": len(samples), "summary": summary, "chart": legend}, indent=1))
    return 0 if samples else 1


if __name__ == "__main__":
    sys.exit(main())
