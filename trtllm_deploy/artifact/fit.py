"""Whether a model variant fits the nodes at a tensor-parallel size, decided before anything is fetched.

Pure arithmetic on a :class:`~trtllm_deploy.artifact.models.Variant` and each node's memory. A GB10's 128 GB
is unified memory: the OS, the container runtime and the model share it, so what a node can give
the model is its MemTotal less a reserve, and TensorRT-LLM then takes its KV cache as a fraction of
what is still free after the weights are loaded (``free_gpu_memory_fraction``).
Sizes are in GB of 1e9 bytes, the unit the model cards and ``models.toml`` use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trtllm_deploy.artifact.models import Variant
from trtllm_deploy.errors import InputError
from trtllm_deploy.hosts.parsers import parse_meminfo

GB = 1e9

# A DGX Spark's memory as sold; pass the node's measured /proc/meminfo MemTotal where it is known
# (the kernel reports somewhat less than the installed LPDDR5x).
GB10_MEMTOTAL_GB = 128.0

# Kept back for everything that is not the model: the OS and its page cache, the desktop DGX OS
# runs, dockerd, the serving process's CUDA context, NCCL/UCX buffers. NVIDIA's playbooks leave a
# similar margin with free_gpu_memory_fraction 0.8-0.9 and tell users to drop the page cache before
# launch; 12 GB leaves 116 GB usable on a 128 GB node. An estimate: measure it and pass reserve_gb.
OS_RESERVE_GB = 12.0

# TensorRT-LLM's own use beside weights and KV cache: activations of one forward pass at the default
# max_num_tokens (8192), the logits buffer, CUDA-graph memory pools and sampler state. An estimate
# for models up to ~120B; pass overhead_gb to change it.
RUNTIME_OVERHEAD_GB = 4.0

# Less KV cache than this is not worth serving: 2 GB holds about 6,000 tokens of Llama-70B context
# per node at tp=2 (80 layers x 8 KV heads x 128 x 2 (K and V) x 2 bytes / 2 ranks = 164 KB a token).
MIN_KV_GB = 2.0

# Attention heads of every preset divide by these, and TensorRT-LLM needs tp to divide them.
TP_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class NodeMemory:
    """One node as the fit check sees it: its name and its MemTotal."""

    name: str
    memtotal_gb: float

    @classmethod
    def from_meminfo(cls, name: str, meminfo: str) -> NodeMemory:
        """From the text of the node's ``/proc/meminfo``."""
        total = parse_meminfo(meminfo).get("MemTotal")
        if not total:
            raise InputError(f"{name}: /proc/meminfo has no MemTotal line\n"
                             "  what to do: run `invoke preflight` on that node and check its output")
        return cls(name, total / GB)


def gb10_nodes(count: int) -> tuple[NodeMemory, ...]:
    """``count`` DGX Sparks at their nominal memory, for planning before the nodes were probed."""
    return tuple(NodeMemory(f"spark-{index}", GB10_MEMTOTAL_GB) for index in range(1, count + 1))


class DoesNotFit(InputError):
    """The plan cannot fit; nothing was fetched or started."""


@dataclass(frozen=True)
class Fit:
    """The numbers of one fit check and what they mean."""

    model: str
    precision: str
    tp: int
    nodes_given: int
    weights_gb: float
    weights_per_node_gb: float
    node: str                 # the tightest node of those the plan uses
    memtotal_gb: float
    reserve_gb: float
    usable_gb: float
    overhead_gb: float
    min_kv_gb: float
    left_gb: float            # usable - weights per node - overhead, on the tightest node
    kv_gb: float              # the KV cache TensorRT-LLM would take there
    kv_basis: str             # "free_gpu_memory_fraction 0.8" or "asked for"
    fits: bool
    smallest_tp: int | None   # the smallest tp that fits, counting nodes like the tightest one
    sentence: str

    def as_dict(self) -> dict:
        """Every number, for ``--json``."""
        return asdict(self)

    def require(self) -> Fit:
        """This fit, or :class:`DoesNotFit` (exit 2) with the sentence and what to do."""
        if self.fits:
            return self
        if self.smallest_tp and self.smallest_tp <= self.nodes_given:
            remedy = f"pass --tp {self.smallest_tp}"
        elif self.smallest_tp:
            remedy = (f"add nodes (tp={self.smallest_tp} needs {self.smallest_tp}),"
                      " or choose a smaller precision with --precision")
        else:
            remedy = "choose a smaller precision with --precision"
        raise DoesNotFit(f"{self.sentence}\n  what to do: {remedy}")


def _gb(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def _nodes(count: int) -> str:
    return f"{count} node" + ("" if count == 1 else "s")


def _place(variant: Variant, tp: int, nodes: tuple[NodeMemory, ...], kv_gb: float | None,
           reserve_gb: float, overhead_gb: float, min_kv_gb: float) -> dict:
    """The numbers for ``tp`` ranks, one per node on the first ``tp`` nodes."""
    used = nodes[:tp]
    tightest = min(used, key=lambda node: node.memtotal_gb)
    per_node = variant.weights_gb / tp
    usable = tightest.memtotal_gb - reserve_gb
    left = usable - per_node - overhead_gb
    fraction = variant.kv_fraction
    if kv_gb is not None:
        kv, basis = kv_gb, "asked for"
        fits = left >= kv_gb
    else:
        fraction = 0.9 if fraction is None else fraction  # TensorRT-LLM's own default
        kv, basis = max(left, 0.0) * fraction, f"free_gpu_memory_fraction {fraction:g}"
        fits = kv >= min_kv_gb
    return dict(weights_per_node_gb=per_node, node=tightest.name, memtotal_gb=tightest.memtotal_gb,
                usable_gb=usable, left_gb=left, kv_gb=kv, kv_basis=basis, fits=fits)


def check(variant: Variant, tp: int, nodes: tuple[NodeMemory, ...] | list[NodeMemory], *,
          kv_gb: float | None = None, reserve_gb: float = OS_RESERVE_GB,
          overhead_gb: float = RUNTIME_OVERHEAD_GB, min_kv_gb: float = MIN_KV_GB) -> Fit:
    """Whether ``variant`` at tensor-parallel ``tp`` (pp=1) fits ``nodes``, the head first.

    Rank i runs on node i, one GPU each. ``kv_gb`` asks for a KV cache of that size on each node;
    without it the KV cache is the variant's ``free_gpu_memory_fraction`` of what is left, and at
    least ``min_kv_gb`` of it must be left for the plan to fit.
    """
    nodes = tuple(nodes)
    if not nodes:
        raise InputError("the fit check needs at least one node\n  what to do: list the nodes in hosts.toml")
    if tp < 1:
        raise InputError(f"tp must be 1 or more, got {tp}\n  what to do: pass --tp 1, 2, 4 or 8")

    limits = dict(kv_gb=kv_gb, reserve_gb=reserve_gb, overhead_gb=overhead_gb, min_kv_gb=min_kv_gb)
    # Past the nodes given, count more nodes like the tightest one, to say how many it would take.
    tightest = min(nodes, key=lambda node: node.memtotal_gb)
    padded = nodes + tuple(NodeMemory(f"another node like {tightest.name}", tightest.memtotal_gb)
                           for _ in range(max(*TP_CHOICES, tp) - len(nodes)))
    smallest = next((choice for choice in TP_CHOICES if _place(variant, choice, padded, **limits)["fits"]),
                    None)

    placed = _place(variant, tp, padded, **limits)
    fits = placed["fits"] and tp <= len(nodes)
    numbers = dict(model=variant.model, precision=variant.precision, tp=tp, nodes_given=len(nodes),
                   weights_gb=variant.weights_gb, reserve_gb=reserve_gb, overhead_gb=overhead_gb,
                   min_kv_gb=min_kv_gb, smallest_tp=smallest, **placed)
    numbers["fits"] = fits
    return Fit(sentence=_sentence(numbers), **numbers)


def _sentence(n: dict) -> str:
    what = f"{n['model']} {n['precision']}"
    where = "one node" if n["tp"] == 1 else "each node"
    spread = f"tp={n['tp']} puts {_gb(n['weights_per_node_gb'])} GB on {where}"
    head = f"{what} needs {_gb(n['weights_gb'])} GB of weights; {spread}"
    usable = (f"{_gb(n['usable_gb'])} GB usable ({_gb(n['memtotal_gb'])} GB MemTotal less"
              f" {_gb(n['reserve_gb'])} GB for the OS)")
    if n["fits"]:
        return (f"{head} — fits: {_gb(n['left_gb'])} GB left beside {_gb(n['overhead_gb'])} GB of runtime"
                f" overhead on a node with {usable}; the KV cache gets {_gb(n['kv_gb'])} GB"
                f" ({n['kv_basis']})")
    if n["tp"] > n["nodes_given"]:
        reason = f"tp={n['tp']} needs {_nodes(n['tp'])} (one GPU each) and {_nodes(n['nodes_given'])} given"
    elif n["left_gb"] <= 0:
        reason = f"{spread} with {usable}"
    elif n["kv_basis"] == "asked for":
        reason = (f"{spread} with {usable}: {_gb(n['left_gb'])} GB left beside the runtime overhead,"
                  f" less than the {_gb(n['kv_gb'])} GB of KV cache asked for")
    else:
        reason = (f"{spread} with {usable}, leaving {_gb(n['kv_gb'])} GB of KV cache ({n['kv_basis']}),"
                  f" less than the {_gb(n['min_kv_gb'])} GB minimum")
    smallest = n["smallest_tp"]
    if smallest is None:
        advice = f"no tp up to {max(TP_CHOICES)} fits; choose a smaller precision"
    elif smallest <= n["nodes_given"]:
        advice = f"the smallest tp that fits is {smallest} (needs {_nodes(smallest)})"
    else:
        advice = (f"{'even all ' if n['nodes_given'] > 1 else ''}{_nodes(n['nodes_given'])}"
                  f" {'are' if n['nodes_given'] > 1 else 'is'} not enough: the smallest tp that fits is"
                  f" {smallest} (needs {_nodes(smallest)})")
    return f"{what} does not fit: {reason}; {advice}"
