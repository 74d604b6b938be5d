"""``invoke engine.*``: phases 3-4, the deployable artifact: plan it, build it, verify it on every node."""

from __future__ import annotations

import contextlib

from invoke import Collection, Context, task
from invoke.exceptions import Exit
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from trtllm_deploy import console
from trtllm_deploy.artifact import build as artifact
from trtllm_deploy.artifact import convert, models
from trtllm_deploy.artifact import verify as copies
from trtllm_deploy.cli import DRY_RUN_HELP, HOSTS_HELP, JSON_HELP, NODES_HELP, show_plan, user_errors
from trtllm_deploy.dryrun import Plan
from trtllm_deploy.hosts import inventory
from trtllm_deploy.source import lock as locks

NAME_HELP = "the artifact's directory name in each node's artifact store (paths.artifacts)"
SHOWN_PROBLEMS = 5  # per node in the table; --json has them all


@task(help={"name": NAME_HELP, "hosts": HOSTS_HELP, "nodes": NODES_HELP, "json": JSON_HELP})
@user_errors
def verify(c: Context, name: str = "", hosts: str = "hosts.toml", nodes: str = "",
           json: bool = False) -> None:
    """Check an artifact against its manifest on every node at once (sizes, hashes, extra files)."""
    copies.check_name(name)
    cluster = inventory.load(hosts)
    selected = cluster.select(nodes)
    with console.err.status(f"verifying {name} on {len(selected)} node(s)…", spinner="dots"):
        results = copies.verify(cluster, selected, name)
    bad = [o.node.name for o in results if not (o.ok and o.value.ok)]
    if json:
        console.print_json({"artifact": name, "ok": not bad, "nodes": {
            o.node.name: o.value.as_json() if o.ok else {"ok": False, "error": o.reason}
            for o in results}})
    else:
        rows = []
        for o in results:
            if not o.ok:
                rows.append([o.node.name, console.status_cell("fail", "unreachable"), "", "", "",
                             o.reason])
                continue
            v = o.value
            problems = [f"{p['path']}: {p['kind']} ({p['detail']})" for p in v.problems]
            if len(problems) > SHOWN_PROBLEMS:
                problems = problems[:SHOWN_PROBLEMS] + [f"… {len(v.problems) - SHOWN_PROBLEMS} more"]
            rows.append([o.node.name, console.status_cell("pass" if v.ok else "fail",
                                                          "ok" if v.ok else "FAILED"),
                         f"{v.files} ({v.cached} cached)", console.size(v.bytes), f"{v.seconds:.2f} s",
                         "\n".join(problems)])
        console.out.print(console.table(f"engine.verify: {name}",
                                        ["node", "result", "files", "size", "time", "problems"], rows))
    if bad:
        raise Exit(f"engine.verify: {name} failed on {', '.join(bad)}", code=1)


MODEL_HELP = "a model name from the presets or your models file (e.g. llama-70b)"
PRECISION_HELP = "bf16, fp8, nvfp4, mxfp4 … (default: the model's default)"
TP_HELP = "tensor-parallel size, one GPU per node (default: the model's recommendation)"
MODELS_HELP = "your models file, merged over the presets (default: ~/.config/trtllm-deploy/models.toml)"
LOCK_HELP = "the TensorRT-LLM lock (default: requirements/tensorrt-llm.lock.toml)"


BUILD_HELP = {
    "model": MODEL_HELP, "precision": PRECISION_HELP, "tp": TP_HELP,
    "backend": "pytorch (default) or tensorrt (TensorRT engines; only at a pin with trtllm-build)",
    "kv_gb": "KV-cache budget per node in GB",
    "quantize": "make --precision (fp8, nvfp4) from the 16-bit checkpoint with NVIDIA Model Optimizer "
                "inside the runtime image, instead of downloading a published quantized one",
    "image": "the runtime image to quantize or build engines in (default: hosts.toml, then the lock's)",
    "max_batch_size": "trtllm-build --max_batch_size (--backend tensorrt; default 16)",
    "max_input_len": "trtllm-build --max_input_len (--backend tensorrt; default 4096)",
    "max_seq_len": "trtllm-build --max_seq_len (--backend tensorrt; default 8192)",
    "models_file": MODELS_HELP, "hosts": HOSTS_HELP, "lock": LOCK_HELP, "json": JSON_HELP,
}


def _planned(hosts: str, lock: str, models_file: str, model: str, precision: str, tp: int,
             backend: str, kv_gb: float, quantize: bool = False, image: str = "",
             engine: tuple[int, int, int] = (0, 0, 0)):
    if not model:
        raise Exit("--model is required (e.g. --model llama-70b)", code=2)
    cluster = inventory.load(hosts)
    lockfile = locks.load(lock)
    catalog = models.load(models_file or None)
    settings = None
    if any(engine):
        defaults = convert.EngineSettings()
        settings = convert.EngineSettings(engine[0] or defaults.max_batch_size,
                                          engine[1] or defaults.max_input_len,
                                          engine[2] or defaults.max_seq_len)
    request = artifact.Request(model, precision or None, tp or None, backend, kv_gb or None, quantize,
                               settings, image or None)
    return cluster, lockfile, artifact.plan(cluster, lockfile, catalog, request)


def _show_fit(planned) -> None:
    variant = planned.variant
    rows = [["checkpoint", f"{variant.repo} @ {variant.revision_text}"],
            ["precision", variant.precision + (f" (quantized from {variant.quantize_from} with Model "
                                               "Optimizer)" if variant.quantize_from else "")],
            ["tensor parallel", str(planned.tp)], ["backend", planned.backend]]
    if planned.in_image:
        rows.append(["made in", planned.image])
    if planned.engine is not None:
        rows.append(["trtllm-build", ", ".join(f"{k} {v}" for k, v in planned.engine.as_dict().items())])
    rows.append(["fit", console.status_cell("pass" if planned.fit.fits else "fail", planned.fit.sentence)])
    console.out.print(console.table(f"engine: {planned.name}", ["", "value"], rows))


@task(help=BUILD_HELP)
@user_errors
def plan(c: Context, model: str = "", precision: str = "", tp: int = 0, backend: str = "pytorch",
         kv_gb: float = 0.0, quantize: bool = False, image: str = "", max_batch_size: int = 0,
         max_input_len: int = 0, max_seq_len: int = 0, models_file: str = "", hosts: str = "hosts.toml",
         lock: str = "requirements/tensorrt-llm.lock.toml", json: bool = False) -> None:
    """Will the model fit? Weights and KV cache per node against each node's memory, nothing fetched."""
    _, _, planned = _planned(hosts, lock, models_file, model, precision, tp, backend, kv_gb, quantize,
                             image, (max_batch_size, max_input_len, max_seq_len))
    if json:
        console.print_json(planned.as_json())
    else:
        _show_fit(planned)
    planned.fit.require()


def _build_plan(cluster, planned) -> Plan:
    """What build would do on the head; whether it is up to date there is found when it runs."""
    head, variant = cluster.head, planned.variant
    plan = Plan("engine.build")
    plan.add(head.name, f"download {variant.repo} @ {variant.revision_text} into {head.paths.model_cache}"
                        " (files already there and whole are kept)")
    if planned.in_image:
        how = (f"quantize to {variant.precision} with Model Optimizer" if variant.quantize_from
               else "build TensorRT engines with trtllm-build")
        plan.add(head.name, f"{how} in {planned.image}")
    plan.add(head.name, f"make {planned.name} in {head.paths.artifacts} (LLM-API YAML, manifest), unless "
                        "it is there and matches its manifest")
    return plan


@task(help=BUILD_HELP | {"dry_run": DRY_RUN_HELP})
@user_errors
def build(c: Context, model: str = "", precision: str = "", tp: int = 0, backend: str = "pytorch",
          kv_gb: float = 0.0, quantize: bool = False, image: str = "", max_batch_size: int = 0,
          max_input_len: int = 0, max_seq_len: int = 0, models_file: str = "",
          hosts: str = "hosts.toml", lock: str = "requirements/tensorrt-llm.lock.toml",
          dry_run: bool = False, json: bool = False) -> None:
    """Make the deployable artifact on the head, in its store (paths.artifacts): checkpoint at its
    pinned revision (quantized, or TensorRT engines, when asked), LLM-API YAML, manifest."""
    cluster, lockfile, planned = _planned(hosts, lock, models_file, model, precision, tp, backend, kv_gb,
                                    quantize, image, (max_batch_size, max_input_len, max_seq_len))
    if not json:
        _show_fit(planned)
    planned.fit.require()
    if dry_run:
        plan = _build_plan(cluster, planned)
        if json:
            return console.print_json(planned.as_json() | plan.as_json())
        return show_plan(plan)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console.err, transient=True) as bar:
        tasks: dict[str, int] = {}
        # The head downloads and reports each file when it is done; until then, this says where.
        bar.add_task(f"{planned.variant.repo} on {cluster.head.name}", total=None)

        def follow(path: str, done: int, total: int) -> None:
            if path not in tasks:
                tasks[path] = bar.add_task(path, total=total)
            bar.update(tasks[path], completed=done)

        with console.err.status(f"making {planned.name} in {planned.image} on {cluster.head.name}…") \
                if planned.in_image else contextlib.nullcontext():
            built = artifact.build(planned, lockfile, cluster.head, progress=follow)
    if json:
        console.print_json(planned.as_json() | built.as_json())
        return
    console.out.print(f"{built.action}: {built.node.name}:{built.path} ({built.files} files, "
                      f"{console.size(built.bytes)}, "
                      f"{planned.variant.repo}@{built.revision[:12]}) in {built.seconds:.1f} s",
                      soft_wrap=True)


ns = Collection("engine", plan, build, verify)
