"""``invoke expect``: the best a deployment can do, from first principles, beside what was claimed."""

from __future__ import annotations

from invoke import Context, task
from invoke.exceptions import Exit

from trtllm_deploy import console
from trtllm_deploy.artifact import models
from trtllm_deploy.cli import JSON_HELP, user_errors
from trtllm_deploy.measure import expect as expectations
from trtllm_deploy.measure.hardware import (USER_ARCHITECTURES, USER_HARDWARE, load_architectures,
                                            load_hardware)


def _rate(value: float) -> str:
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _speeds(low: float, high: float) -> str:
    return _rate(low) if low == high else f"{_rate(low)}-{_rate(high)}"


@task(help={
    "model": "a model name from models.toml or architectures.toml (e.g. llama-70b)",
    "precision": "bf16, fp8, nvfp4, mxfp4 … (default: the model's default)",
    "tp": "tensor-parallel size (default 1)",
    "nodes": "nodes the ranks run on (default: as few as hold tp GPUs)",
    "hardware": "an entry of the hardware table: gb10 (default), h100-sxm, h200-sxm or your own",
    "batch": "concurrent streams sharing each read of the weights (default 1)",
    "fabric_gbps": "measured link bandwidth in Gb/s, instead of the table's nominal one",
    "fabric_latency_us": "measured latency of one all-reduce step in µs, instead of the table's",
    "hardware_file": "your hardware file, merged over the shipped table "
                     f"(default: {USER_HARDWARE} if it exists)",
    "architectures": f"your architectures file (default: {USER_ARCHITECTURES} if it exists)",
    "models_file": "your models file, merged over the presets (default: ~/.config/trtllm-deploy/models.toml)",
    "json": JSON_HELP,
})
@user_errors
def expect(c: Context, model: str = "", precision: str = "", tp: int = 1, nodes: int = 0,
           hardware: str = "gb10", batch: int = 1, fabric_gbps: float = 0.0, fabric_latency_us: float = -1.0,
           hardware_file: str = "", architectures: str = "", models_file: str = "",
           json: bool = False) -> None:
    """What a model can reach at best: memory per node, decode and prefill bounds, the ceiling, the claims."""
    if not model:
        raise Exit("--model is required (e.g. --model llama-70b)", code=2)
    catalog = models.load(models_file or None)
    table = load_hardware(hardware_file or None)
    shapes = load_architectures(architectures or None)
    found = expectations.ceiling(model, precision or None, tp, hardware, nodes=nodes or None, batch=batch,
                                 catalog=catalog, hardware_table=table, architectures=shapes,
                                 fabric_gbps=fabric_gbps or None,
                                 fabric_latency_us=None if fabric_latency_us < 0 else fabric_latency_us)
    claimed = expectations.comparisons(catalog, table, shapes, model=model) if hardware == "gb10" else []
    if json:
        console.print_json({"expectation": found.as_dict(), "claims": [c.as_dict() for c in claimed]})
        return
    e = found
    streams = "1 stream" if e.batch == 1 else f"{e.batch} streams, all together"
    rows = [
        ["weights", f"{e.weights_gb:.1f} GB; {e.weights_per_node_gb:.1f} GB per node at tp={e.tp}"],
        ["KV cache", f"{e.kv_cache_gb:.1f} GB per node at the configured budget"],
        ["fits", console.status_cell("pass" if e.fits else "fail", e.fit)],
        ["read per token", f"{e.read_per_token_gb:.2f} GB per node (the weights a token uses, one"
                           " embedding row)"],
        ["decode, bandwidth bound", f"{_rate(e.decode_bandwidth_bound)} tokens/s"
                                    f" ({e.memory_bandwidth_gbs:g} GB/s ÷ {e.read_per_token_gb:.2f} GB"
                                    f"{'' if e.batch == 1 else f' × {e.batch}'})"],
        ["all-reduces", f"{e.allreduces_per_token} a token of {e.allreduce_bytes:,} bytes over {e.link}:"
                        f" {e.allreduce_us_per_token:,.0f} µs" if e.allreduces_per_token else "none (tp=1)"],
        ["prefill, compute bound", f"{_rate(e.prefill_tokens_per_s_bound)} tokens/s"
                                   f" ({e.tflops:g} dense {e.tensor_format} TFLOPS)"],
        ["decode ceiling", f"{_rate(e.decode_tokens_per_s_bound)} tokens/s ({streams})"],
    ] + [["note", note] for note in e.notes]
    title = f"expect: {e.model} {e.precision}, tp={e.tp} on {e.nodes} × {e.hardware}"
    console.out.print(console.table(title, ["", "value"], rows))
    if claimed:
        lines = [[c.kind, c.configuration, c.where, f"tp={c.tp}, {c.nodes} node(s), batch {c.batch}",
                  _speeds(c.low, c.high), _rate(c.ceiling),
                  console.status_cell("fail" if c.above else "pass",
                                      f"above the ceiling ({c.high / c.ceiling:.1f}×)" if c.above
                                      else f"{c.high / c.ceiling:.0%} of it")] for c in claimed]
        console.out.print(console.table(f"claimed and measured for {model} (tokens/s), each against the"
                                        " ceiling of its own configuration",
                                        ["", "configuration", "from", "setup", "speed", "ceiling", ""],
                                        lines))
