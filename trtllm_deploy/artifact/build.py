"""``invoke engine.plan`` and ``invoke engine.build``: the deployable artifact, made on the head.

At every TensorRT-LLM pin the artifact can be what the PyTorch backend serves: the checkpoint's
files at a pinned Hub revision (or that checkpoint quantized to FP8/NVFP4 with Model Optimizer inside
the runtime image, when no quantized one is published or ``--quantize`` asks for it), the LLM-API
YAML that suits DGX Spark, and a manifest (every file's size and hash, plus provenance). At a pin
that still has ``trtllm-build``, ``--backend tensorrt`` makes TensorRT engines instead (convert.py).
It is named from model, precision, tp, backend and the TensorRT-LLM lock, and made on the head
(``cluster.head``, this machine when its connection is "local", over SSH otherwise: one code path):
downloaded into the head's Hugging Face cache, made in a hidden folder of the head's store
(``paths.artifacts``, where push, launch and engine.verify look) and renamed into place whole, so
this machine needs no checkpoint disk, Docker or GPU. The fit check runs before any download; the
same inputs with a verified manifest (checked on the head) mean nothing to do.
"""

from __future__ import annotations

import posixpath
import secrets as _random
import time
from dataclasses import dataclass, field

import yaml

from trtllm_deploy import __version__
from trtllm_deploy.artifact import convert, fit, hub, models, ship
from trtllm_deploy.artifact.verify import VERIFY_TIMEOUT
from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.fanout import fan_out
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.targets import Target, expand
from trtllm_deploy.source.plan import image_ref
from trtllm_deploy.source.lock import LockFile

LLM_API_FILE = "llm-api.yaml"
BACKENDS = ("pytorch", "tensorrt")
# LLM-API keys only the PyTorch backend takes; an engine artifact's YAML leaves them out.
PYTORCH_ONLY = ("cuda_graph_config", "disable_overlap_scheduler", "moe_config", "attn_backend",
                "torch_compile_config", "print_iter_log", "enable_iter_perf_stats")
# What an artifact's provenance records but "up to date" does not compare: a checkpoint served by
# the PyTorch backend does not change when the image does.
NOT_COMPARED = ("created", "image")


@dataclass(frozen=True)
class Request:
    model: str
    precision: str | None = None
    tp: int | None = None
    backend: str = "pytorch"
    kv_gb: float | None = None
    quantize: bool = False                          # make the precision with Model Optimizer
    engine: convert.EngineSettings | None = None    # --backend tensorrt's trtllm-build settings
    image: str | None = None                        # the runtime image (default: hosts.toml, the lock)


@dataclass
class Planned:
    variant: models.Variant
    tp: int
    fit: fit.Fit
    name: str
    nodes: int
    backend: str = "pytorch"
    image: str = ""
    ulimits: dict = field(default_factory=dict)
    engine: convert.EngineSettings | None = None

    @property
    def in_image(self) -> bool:
        """Whether making it runs the runtime image (quantizing, or TensorRT engines)."""
        return bool(self.variant.quantize_from) or self.backend == "tensorrt"

    def as_json(self) -> dict:
        return {"artifact": self.name, "model": self.variant.model, "precision": self.variant.precision,
                "repo": self.variant.repo, "revision": self.variant.revision_text, "tp": self.tp,
                "backend": self.backend, "quantize_from": self.variant.quantize_from,
                "image": self.image if self.in_image else None, "fit": self.fit.as_dict()}


def node_memory(cluster: Cluster) -> tuple[fit.NodeMemory, ...]:
    """Each node's MemTotal, read over SSH from ``/proc/meminfo`` (head first)."""
    seen = fan_out(cluster.nodes, lambda node, target: target.run(["cat", "/proc/meminfo"],
                                                                   timeout=60).stdout)
    seen.raise_for_failures()
    return tuple(fit.NodeMemory.from_meminfo(outcome.node.name, outcome.value) for outcome in seen)


def plan(cluster: Cluster, lockfile: LockFile, catalog: models.Catalog, request: Request,
         nodes: tuple[fit.NodeMemory, ...] | None = None) -> Planned:
    """Everything that can refuse the build, before anything is downloaded."""
    if request.backend not in BACKENDS:
        raise InputError(f"--backend {request.backend!r}: expected one of {', '.join(BACKENDS)}")
    if request.engine is not None and request.backend != "tensorrt":
        raise InputError("--max-batch-size, --max-input-len and --max-seq-len are trtllm-build settings "
                         "(--backend tensorrt); for the PyTorch backend set max_batch_size / max_seq_len "
                         "in the model's llm_api (your models file)")
    model = catalog.get(request.model)
    variant = model.variant(request.precision, quantize=request.quantize)
    if request.backend == "tensorrt":
        if lockfile.lock.source.trtllm_build is False:
            raise InputError(
                "--backend tensorrt: the pinned TensorRT-LLM has no trtllm-build; the TensorRT-engine "
                "backend was removed from main in mid-2026 (docs/SOURCES.md). Serve the checkpoint with the "
                "PyTorch backend (the default), or pin an older commit that still has it")
        if variant.precision not in ("bf16", "fp16", *convert.QUANT_ALGOS):
            raise InputError(f"--backend tensorrt makes bf16, fp16, fp8 or nvfp4 engines, not "
                             f"{variant.precision}\n  what to do: use the PyTorch backend (the default)")
        if variant.precision in convert.QUANT_ALGOS and not variant.quantize_from:
            # The TensorRT backend quantizes the 16-bit checkpoint itself (examples/quantization).
            variant = model.variant(variant.precision, quantize=True)
    memory = nodes or node_memory(cluster)
    tp = request.tp or variant.recommended_tp(len(memory)) or 1
    if tp > len(memory):
        raise InputError(f"--tp {tp}: the cluster has {len(memory)} node(s) (one GPU each); "
                         f"use at most --tp {len(memory)}")
    result = fit.check(variant, tp, memory, kv_gb=request.kv_gb)
    if variant.quantize_from:
        _quantizing_fits(model, variant, memory[0])
    made = "-quantized" if variant.quantize_from and request.backend == "pytorch" else ""
    backend = "-trt" if request.backend == "tensorrt" else ""
    name = f"{variant.model}-{variant.precision}{made}-tp{tp}{backend}-{lockfile.hash[:8]}"
    image = request.image or cluster.head.container.image or image_ref(lockfile)
    engine = (request.engine or convert.EngineSettings()) if request.backend == "tensorrt" else None
    if engine is not None:
        engine.check()
    return Planned(variant, tp, result, name, len(memory), request.backend, image,
                   dict(cluster.head.container.ulimits), engine)


def _quantizing_fits(model: models.Model, variant: models.Variant, node: fit.NodeMemory) -> None:
    """Quantizing loads the whole 16-bit checkpoint on this one machine (the head)."""
    source = model.variants[variant.quantize_from]
    usable = node.memtotal_gb - fit.OS_RESERVE_GB - fit.RUNTIME_OVERHEAD_GB
    if source.weights_gb > usable:
        raise fit.DoesNotFit(
            f"quantizing {variant.model} to {variant.precision} loads its {source.weights_gb:.1f} GB of "
            f"{source.precision} weights on one node ({node.name}), which has {usable:.1f} GB usable\n"
            f"  what to do: use a published {variant.precision} checkpoint (drop --quantize, or give the "
            "variant a repo in your models file), or quantize on a machine with more memory")


@dataclass
class Built:
    node: Node                  # the head, whose store holds the artifact
    path: str                   # the artifact on the head
    action: str                 # "built" | "up to date"
    revision: str
    files: int
    bytes: int
    seconds: float

    def as_json(self) -> dict:
        return {"node": self.node.name, "path": self.path, "action": self.action,
                "revision": self.revision, "files": self.files, "bytes": self.bytes,
                "seconds": round(self.seconds, 2)}


def llm_api(planned: Planned) -> dict:
    settings = planned.variant.llm_api(planned.nodes)
    if planned.backend == "tensorrt":
        settings = {key: value for key, value in settings.items() if key not in PYTORCH_ONLY}
    return settings


def provenance(planned: Planned, lockfile: LockFile, revision: str,
               image: convert.Image | None) -> dict:
    """What the artifact is made of and from. ``image``: the runtime image as the head has it
    (its ID and digests); a quantized or engine artifact is tied to it, a plain checkpoint is not."""
    lock, variant = lockfile.lock, planned.variant
    made = {}
    if variant.quantize_from:
        made["quantized"] = {"from": variant.quantize_from, "with": convert.quantize_inputs(lockfile)}
    if planned.engine is not None:
        made["engine"] = planned.engine.as_dict()
    if planned.in_image:
        made["made_in"] = {"ref": planned.image, "id": image.id if image else None}
    return {"model": variant.model, "repo": variant.repo, "revision": revision,
            "precision": variant.precision, "tp": planned.tp, "backend": planned.backend,
            "trtllm_commit": lock.source.commit, "trtllm_version": lock.source.version,
            "lock_hash": lockfile.hash, "cuda_archs": lock.build.cuda_archs,
            "image": image.provenance() if image else {"ref": planned.image, "id": None},
            "llm_api": llm_api(planned), "builder": f"trtllm-deploy {__version__}", **made}


def hub_cache(head: Node) -> str:
    """The head's Hugging Face Hub cache: ``hub/`` in its ``model_cache`` (what ``HF_HOME`` is to
    huggingface_hub), so the Hub's own tools there find what was downloaded."""
    return posixpath.join(head.paths.model_cache, "hub")


def build(planned: Planned, lockfile: LockFile, head: Node, progress=None,
          target: Target | None = None) -> Built:
    """On the head: fetch into its Hub cache, make (assemble, quantize or build engines) in its
    store, write the YAML and the manifest, then rename the artifact into place there. ``target``
    reaches the head (default: a connection of its own, closed at the end)."""
    own = target is None
    target = target or connect(head)
    try:
        return _build(planned, lockfile, head, target, progress)
    finally:
        if own:
            target.close()


def _build(planned: Planned, lockfile: LockFile, head: Node, target: Target, progress) -> Built:
    started = time.monotonic()
    planned.fit.require()
    variant = planned.variant
    what = ("quantizing" if variant.quantize_from and planned.backend == "pytorch"
            else "building TensorRT engines")
    image = convert.head_image(target, planned.image, needed_for=what if planned.in_image else None)
    if planned.backend == "tensorrt" and lockfile.lock.source.trtllm_build is None \
            and not convert.has_trtllm_build(image):
        raise InputError(f"--backend tensorrt: the image {image.reference} has no trtllm-build (the "
                         "TensorRT-engine backend is gone from its TensorRT-LLM); use the PyTorch backend")
    revision = variant.revision or hub.resolve(variant.repo, "main")
    wanted = provenance(planned, lockfile, revision, image)
    home = target.home()
    store = expand(head.paths.artifacts, home)
    final = posixpath.join(store, planned.name)
    agent = ship.HeadAgent(target)
    current = _current(agent, final, wanted)
    if current is not None:
        return Built(head, final, "up to date", revision, len(current["files"]), current["total_bytes"],
                     time.monotonic() - started)
    snapshot = hub.fetch_on(target, hub_cache(head), variant.repo, revision, progress=progress)
    scratch = posixpath.join(store, f".{planned.name}.partial-{_random.token_hex(4)}")
    work = posixpath.join(store, f".{planned.name}.work-{_random.token_hex(4)}")
    log = posixpath.join(store, ".logs", f"{planned.name}.log")
    target.run(["mkdir", "-p", store], timeout=60)
    try:
        made = {}
        if planned.in_image:
            runner = convert.Runner(image, log, planned.ulimits)
            if planned.backend == "tensorrt":
                made = convert.tensorrt_engines(snapshot, scratch, variant.precision, planned.tp,
                                                planned.engine, lockfile, runner, work)
            else:
                tools = posixpath.join(home, ".cache", "trtllm-deploy")
                made = {"quantized": {"from": variant.quantize_from, "with": convert.quantize_inputs(
                    lockfile), "run": convert.quantize(snapshot, scratch, variant.precision, lockfile,
                                                       runner, tools)}}
        sealed = _ask(agent, "seal", order={
            "scratch": scratch, "final": final, "snapshot": snapshot, "link": not planned.in_image,
            "files": {LLM_API_FILE: yaml.safe_dump(llm_api(planned), sort_keys=True)},
            "provenance": wanted | made | {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})
    except BaseException:
        target.run(["rm", "-rf", "--", scratch], timeout=600, check=False)
        raise
    finally:
        target.run(["rm", "-rf", "--", work], timeout=600, check=False)
    return Built(head, final, "built", revision, sealed["files"], sealed["total_bytes"],
                 time.monotonic() - started)


def _ask(agent: ship.HeadAgent, verb: str, *args: str, order: dict | None = None) -> dict:
    answer, _ = agent.run(verb, *args, order=order, timeout=VERIFY_TIMEOUT)
    if not answer.get("ok"):
        raise DeployError(f"{agent.target.name}: making the artifact failed: {answer.get('error')}")
    return answer


def _current(agent: ship.HeadAgent, final: str, wanted: dict) -> dict | None:
    """The artifact's manifest if it was made from the same inputs and still verifies (checked on
    the head, by its manifest.py)."""
    answer = _ask(agent, "current", final)
    found = answer.get("manifest")
    if found is None:
        return None
    compared = [key for key in wanted if key not in NOT_COMPARED]
    recorded = found.get("provenance", {})
    same = all(_same(recorded.get(key), wanted[key]) for key in compared)
    if not same or answer.get("problems"):
        return None
    return found


def _same(recorded, wanted) -> bool:
    """Equal, where what was recorded may hold more than what is asked (a quantized artifact records
    the run's details beside its inputs)."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        return all(_same(recorded.get(key), value) for key, value in wanted.items())
    return recorded == wanted
