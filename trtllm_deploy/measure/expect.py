"""What a deployment can reach at best, from first principles: memory per node, the bandwidth bound on
decode, the compute bound on prefill, the cost of tensor-parallel all-reduces, and the ceiling.

The numbers come from data (read and checked by ``hardware.py``): ``hardware.toml`` (what the
accelerators and links do), ``architectures.toml`` (the shape of each model), ``models.toml`` (their
sizes) and ``claims.toml`` (what the plan claimed and others measured, each compared here with its
own ceiling). ``bench`` calls :func:`ceiling` to report efficiency.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Literal

from trtllm_deploy.artifact import fit, models
from trtllm_deploy.errors import InputError
from trtllm_deploy.measure.hardware import (USER_ARCHITECTURES, USER_HARDWARE, Architecture, ClaimsFile,
                                            Hardware, Link, load_architectures, load_claims, load_hardware)

# Activations cross the links in 16 bits whatever the weights' precision.
ACTIVATION_BYTES = 2
# Quantized checkpoints keep the embedding in BF16 (models.toml); a decode step reads one row of it.
EMBEDDING_BYTES = 2
ALLREDUCES_PER_LAYER = 2      # after attention and after the MLP (Megatron-style tensor parallelism)
# The tensor format each precision's matrix multiplies run in, and what to fall back to on a chip
# that lacks it (Hopper has no FP4: its weights are dequantized, at FP8's rate at best).
FORMAT = {"bf16": "bf16", "fp16": "bf16", "fp8": "fp8", "nvfp4": "fp4", "mxfp4": "fp4"}
WIDER = {"fp4": "fp8", "fp8": "bf16"}


def _named(table: dict, name: str, what: str, remedy: str):
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InputError(f"no {what} named {name!r}{hint}; known: {', '.join(sorted(table))}\n"
                     f"  what to do: {remedy}")


@dataclass(frozen=True)
class Expectation:
    """The best a configuration can do, and each bound it is made of. Rates in tokens/s."""

    model: str
    precision: str
    tp: int
    nodes: int
    hardware: str
    batch: int
    # memory, per node (GB)
    weights_gb: float
    weights_per_node_gb: float
    kv_cache_gb: float
    fits: bool
    fit: str
    # decode: every step reads each node's share of the weights once
    read_per_token_gb: float          # per node, per decode step
    memory_bandwidth_gbs: float
    decode_bandwidth_bound: float     # with no all-reduce cost
    # tensor parallelism
    link: str                         # "ConnectX-7 200 Gb/s, 2 µs", or "" at tp 1
    allreduces_per_token: int
    allreduce_bytes: int
    allreduce_us_per_token: float
    # compute
    tensor_format: str
    tflops: float
    prefill_tokens_per_s_bound: float
    decode_tokens_per_s_bound: float  # the ceiling: all of the above together
    notes: tuple[str, ...] = field(default=())

    def efficiency(self, measured_tokens_per_s: float) -> float:
        """The share of the ceiling a measured decode rate reached (1.0 = at the ceiling)."""
        return measured_tokens_per_s / self.decode_tokens_per_s_bound

    def as_dict(self) -> dict:
        return asdict(self)


def _variant(name: str, precision: str, arch: Architecture, catalog: models.Catalog) -> models.Variant:
    """The catalog's variant, or one made from a reference architecture's own size."""
    if name in catalog.models:
        return catalog.get(name).variant(precision)
    wanted = precision.strip().lower()
    if arch.params_billion is None or wanted not in arch.bytes_per_param:
        raise InputError(
            f"{name} is not in models.toml, and architectures.toml gives it no size at {wanted}\n"
            f"  what to do: add it to {models.USER_FILE}, or give [architectures.{name}] params_billion"
            f" and bytes_per_param = {{ {wanted} = ... }}")
    return models.Variant(model=name, precision=wanted, repo="", revision=None, gated=False,
                          params_billion=float(arch.params_billion),
                          bytes_per_param=float(arch.bytes_per_param[wanted]), tp_by_nodes={},
                          settings={}, settings_one_node={})


def _tflops(hw: Hardware, precision: str) -> tuple[str, float, str]:
    wanted = fmt = FORMAT[precision]
    while getattr(hw.tflops, fmt) is None and fmt in WIDER:
        fmt = WIDER[fmt]
    rate = getattr(hw.tflops, fmt)
    if rate is None:
        raise InputError(f"the hardware table gives no tensor TFLOPS for {wanted} or wider\n"
                         "  what to do: add tflops = { bf16 = ... } to its entry")
    note = "" if fmt == wanted else f"no {wanted} tensor cores: counted at the {fmt} rate"
    return fmt, float(rate), note


def ring_allreduce_seconds(size_bytes: float, ranks: int, link: Link) -> float:
    """A ring all-reduce of ``size_bytes`` over ``ranks``: 2(n-1)/n of the data crosses each link,
    in 2(n-1) steps that each pay the link's latency."""
    if ranks < 2:
        return 0.0
    steps = 2 * (ranks - 1)
    return steps / ranks * size_bytes / (link.gbps * 1e9 / 8) + steps * link.latency_us * 1e-6


def ceiling(model: str, precision: str | None, tp: int, hardware: str | Hardware = "gb10", *,
            nodes: int | None = None, batch: int = 1, catalog: models.Catalog | None = None,
            hardware_table: dict[str, Hardware] | None = None,
            architectures: dict[str, Architecture] | None = None,
            fabric_gbps: float | None = None, fabric_latency_us: float | None = None) -> Expectation:
    """The ceiling of ``model`` at ``precision`` and tensor-parallel ``tp`` on ``hardware``.

    ``batch`` concurrent streams share each read of the weights (the rate is then their sum).
    ``fabric_gbps``/``fabric_latency_us`` replace the nominal link with measured figures.
    """
    catalog = catalog if catalog is not None else models.load(None)
    architectures = architectures if architectures is not None else load_architectures()
    if isinstance(hardware, str):
        hw_name = hardware
        hw = _named(hardware_table if hardware_table is not None else load_hardware(), hardware,
                    "hardware", f"pick one of those, or add [hardware.{hardware}] to {USER_HARDWARE}")
    else:
        hw_name, hw = hardware.description or "custom", hardware
    if tp < 1 or batch < 1:
        raise InputError("tp and batch must be 1 or more\n  what to do: pass --tp 1, 2, 4 or 8")
    nodes = nodes or -(-tp // hw.gpus_per_node)
    needed = -(-tp // hw.gpus_per_node)
    if nodes < needed:
        raise InputError(f"tp={tp} needs {needed} node(s) of {hw.gpus_per_node} GPU(s); {nodes} given\n"
                         f"  what to do: pass --nodes {needed} or a smaller --tp")
    arch = _named(architectures, model, "architecture",
                  f"add [architectures.{model}] (layers, hidden_size, vocab_size) to {USER_ARCHITECTURES}")
    if not precision and model in catalog.models:
        precision = catalog.models[model].default_precision
    variant = _variant(model, precision or "", arch, catalog)
    notes = []

    # Memory: the fit check, on nodes of this hardware's memory (one rank each).
    placed = fit.check(variant, tp, tuple(fit.NodeMemory(f"node-{i + 1}", float(hw.memory_gb))
                                          for i in range(tp)),
                       reserve_gb=float(hw.os_reserve_gb))

    # Decode reads every weight a token uses once a step; the embedding only one row of it.
    embedding_gb = 0.0 if arch.tied_embeddings else arch.vocab_size * arch.hidden_size * EMBEDDING_BYTES / 1e9
    if arch.active_params_billion is not None:
        embedding_params = embedding_gb / EMBEDDING_BYTES
        used_gb = max(arch.active_params_billion - embedding_params, 0.0) * variant.bytes_per_param
        compute_params = arch.active_params_billion * 1e9
        notes.append(f"mixture of experts: {arch.active_params_billion:g}B of"
                     f" {variant.params_billion:g}B parameters read per token")
    else:
        used_gb = variant.weights_gb - embedding_gb
        # The lm_head multiplies; the embedding table (when it is a separate one) only looks up.
        compute_params = (variant.params_billion - embedding_gb / EMBEDDING_BYTES) * 1e9
    read_gb = used_gb / tp
    step_memory_s = read_gb * 1e9 / (hw.memory_bandwidth_gbs * 1e9)

    link = None
    if tp > 1:
        link = hw.link if tp <= hw.gpus_per_node and hw.link else hw.fabric
        if link is None:
            raise InputError(f"{hw_name} has no link or fabric in the hardware table, needed at tp={tp}\n"
                             f"  what to do: add [hardware.{hw_name}.fabric] name, gbps, latency_us")
        if fabric_gbps or fabric_latency_us is not None:
            link = Link(name=f"{link.name} (measured)", gbps=fabric_gbps or link.gbps,
                        latency_us=link.latency_us if fabric_latency_us is None else fabric_latency_us)
    allreduces = ALLREDUCES_PER_LAYER * arch.layers if tp > 1 else 0
    size = arch.hidden_size * ACTIVATION_BYTES * batch
    allreduce_s = allreduces * ring_allreduce_seconds(size, tp, link) if link else 0.0

    fmt, tflops, note = _tflops(hw, variant.precision)
    if note:
        notes.append(note)
    # Two FLOPs (a multiply and an add) per parameter per token, the parameters split over tp ranks.
    compute_bound = tflops * 1e12 / (2 * compute_params / tp)
    decode = min(batch / (step_memory_s + allreduce_s), compute_bound)
    return Expectation(
        model=model, precision=variant.precision, tp=tp, nodes=nodes, hardware=hw_name, batch=batch,
        weights_gb=variant.weights_gb, weights_per_node_gb=placed.weights_per_node_gb,
        kv_cache_gb=placed.kv_gb, fits=placed.fits, fit=placed.sentence,
        read_per_token_gb=read_gb, memory_bandwidth_gbs=float(hw.memory_bandwidth_gbs),
        decode_bandwidth_bound=batch / step_memory_s,
        link=f"{link.name} {link.gbps:g} Gb/s, {link.latency_us:g} µs" if link else "",
        allreduces_per_token=allreduces, allreduce_bytes=size, allreduce_us_per_token=allreduce_s * 1e6,
        tensor_format=fmt, tflops=tflops, prefill_tokens_per_s_bound=compute_bound,
        decode_tokens_per_s_bound=decode, notes=tuple(notes))


@dataclass(frozen=True)
class Comparison:
    """A claimed or measured speed beside the ceiling of its own configuration."""

    kind: Literal["plan", "published"]
    configuration: str
    where: str                        # the plan's section, or the measurement's source
    model: str
    precision: str
    tp: int
    nodes: int
    batch: int
    low: float
    high: float
    ceiling: float
    above: bool                       # the claim (its high end) is above the ceiling

    def as_dict(self) -> dict:
        return asdict(self)


def comparisons(catalog: models.Catalog | None = None, hardware_table: dict[str, Hardware] | None = None,
                architectures: dict[str, Architecture] | None = None, claims: ClaimsFile | None = None,
                model: str | None = None) -> list[Comparison]:
    """Every plan claim and published measurement (for ``model`` only, if given) with its ceiling."""
    catalog = catalog if catalog is not None else models.load(None)
    hardware_table = hardware_table if hardware_table is not None else load_hardware()
    architectures = architectures if architectures is not None else load_architectures()
    claims = claims if claims is not None else load_claims()
    out = []
    entries = ([("plan", c, c.section) for c in claims.plan]
               + [("published", p, p.source) for p in claims.published])
    for kind, entry, where in entries:
        if model and entry.model != model:
            continue
        bound = ceiling(entry.model, entry.precision, entry.tp, entry.hardware, nodes=entry.nodes,
                        batch=entry.batch, catalog=catalog, hardware_table=hardware_table,
                        architectures=architectures).decode_tokens_per_s_bound
        speeds = entry.tokens_per_s if isinstance(entry.tokens_per_s, list) else [entry.tokens_per_s]
        low, high = float(min(speeds)), float(max(speeds))
        configuration = entry.configuration + (f" [{entry.engine}]" if kind == "published"
                                               and entry.engine not in entry.configuration else "")
        out.append(Comparison(kind, configuration, where, entry.model, entry.precision, entry.tp,
                              entry.nodes, entry.batch, low, high, bound, high > bound))
    return out
