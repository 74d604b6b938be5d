"""Making an artifact inside the runtime image: quantizing, and TensorRT engines.

Both run the tools the pinned TensorRT-LLM image carries, in a container of that image on this
machine's Docker engine (where ``engine.build`` runs and keeps its artifact store):

- **Quantizing** (a variant made from a 16-bit checkpoint, ``quantize_from`` or ``--quantize``):
  NVIDIA Model Optimizer's ``examples/llm_ptq/hf_ptq.py`` from a checkout pinned in the lock's
  ``[quantize]``, run by the image's python3 with the image's own ``nvidia-modelopt``; the result is
  a quantized Hugging Face checkpoint, checked for its quantization config.
- **TensorRT engines** (``--backend tensorrt``, only at a pin that still has ``trtllm-build``): the
  image's per-model ``convert_checkpoint.py`` (or ``examples/quantization/quantize.py`` for FP8 and
  NVFP4) with ``--tp_size``, then ``trtllm-build`` with ``--gemm_plugin``, ``--max_batch_size``,
  ``--max_input_len``, ``--max_seq_len`` and ``--workers``.

A container is removed whatever happens (Ctrl-C included); a failure is explained from its log.
"""

from __future__ import annotations

import json
import os
import re
import secrets as _random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trtllm_deploy.artifact import hub
from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.hosts import dockercli
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.runtimes import failures
from trtllm_deploy.source.lock import LockFile, Quantize

EXAMPLES = "/app/tensorrt_llm/examples"   # where release images keep TensorRT-LLM's examples
MODELOPT_MOUNT = "/opt/trtllm-deploy/modelopt"
HF_PTQ = "examples/llm_ptq/hf_ptq.py"
# The per-model examples folder for a checkpoint's config.json model_type.
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen": "qwen", "qwen2": "qwen", "qwen3": "qwen",
            "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi", "phi": "phi",
            "mixtral": "mixtral", "gpt_oss": None}
QUANT_ALGOS = {"fp8": "FP8", "nvfp4": "NVFP4"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja", "config.json")
SERVE_FLAGS = ("--ipc", "host", "--network", "host")  # plus the ulimits of hosts.toml's container


Image = dockercli.LocalImage


def local_image(ref: str, needed_for: str | None = None) -> Image | None:
    """The image as this machine's Docker engine has it; None when it has none (or no engine), unless
    ``needed_for`` says what needs it, which makes that an error with what to do."""
    found = dockercli.inspect_image(ref)
    if found is None and needed_for:
        raise DeployError(f"{needed_for} runs inside the runtime image {ref}, which this machine's Docker "
                          "engine does not have\n  what to do: run engine.build on the build node "
                          "after `invoke image` (or pass --image REF of an image this machine has)")
    return found


def _gpus() -> list[str]:
    runtimes = dockercli.docker("info", "--format", "{{json .Runtimes}}", check=False, timeout=60)
    return ["--gpus", "all"] if b'"nvidia"' in runtimes.stdout else []


@dataclass(frozen=True)
class Runner:
    """Runs the image's tools: ``image``, the container ulimits (hosts.toml), one log for all steps."""

    image: Image
    log: Path
    ulimits: dict[str, str]

    def run(self, argv: list[str], mounts: list[tuple[Path, str, bool]], what: str,
            env: dict[str, str] | None = None) -> None:
        run_in_image(self.image, argv, mounts, self.log, what, env, self.ulimits)


def run_in_image(image: Image, argv: list[str], mounts: list[tuple[Path, str, bool]], log: Path,
                 what: str, env: dict[str, str] | None = None,
                 ulimits: dict[str, str] | None = None) -> None:
    """``argv`` in a fresh container of ``image`` with ``mounts`` (host path, container path,
    read-only), as this user (files it writes are the user's), output appended to ``log``.
    ``env`` values reach the container through docker's environment, never its command line."""
    name = f"trtllm-deploy-make-{_random.token_hex(4)}"
    command = ["docker", "run", "--rm", "--name", name, "--user", f"{os.getuid()}:{os.getgid()}",
               "--env", "HOME=/tmp", *SERVE_FLAGS, *_gpus(),
               *(arg for key, value in (ulimits or {}).items() for arg in ("--ulimit", f"{key}={value}"))]
    for host, inside, read_only in mounts:
        command += ["--volume", f"{host}:{inside}:{'ro' if read_only else 'rw'}"]
    for key in env or {}:
        command += ["--env", key]  # the value comes from docker's own environment
    command += [image.reference, *argv]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        try:
            code = process.wait()
        except BaseException:
            process.kill()
            raise
        finally:
            # The docker client's end does not stop the container; this does (and is a no-op after
            # --rm removed it).
            dockercli.docker("rm", "--force", name, check=False, timeout=120)
    if code != 0:
        text = log.read_text(errors="replace")
        raise DeployError(failures.explain(f"{what} failed in {image.reference} (exit {code}; log {log})",
                                           text))


# Looks inside the image, each in a throwaway container of it (its entrypoint bypassed).
MODELOPT_VERSION = Script("read the image's Model Optimizer version",
                          "python3 -c \"import importlib.metadata as m; print(m.version('nvidia-modelopt'))\""
                          " 2>/dev/null")
TRTLLM_BUILD = Script("look for trtllm-build in the image", "command -v trtllm-build")
FIRST_FILE = Script("look for the model's convert_checkpoint.py in the image",
                    'for f do if [ -f "$f" ]; then echo "$f"; break; fi; done')


def _one_line(image: Image, script: Script, *args: str) -> str:
    shell, *rest = script.argv(args)
    done = dockercli.docker("run", "--rm", "--entrypoint", shell, image.reference, *rest,
                            check=False, timeout=300)
    return dockercli.text(done) if done.returncode == 0 else ""


# --- quantizing with Model Optimizer ------------------------------------------------------------

def modelopt_version(image: Image) -> str | None:
    return _one_line(image, MODELOPT_VERSION) or None


def modelopt_checkout(settings: Quantize, ref: str, cache: Path) -> tuple[Path, str]:
    """The Model Optimizer tree at ``ref`` (and at ``settings.commit`` when the lock pins one), fetched
    once into ``cache`` and reused; returns its folder and commit."""
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{ref}-{settings.commit or 'ref'}")
    final = cache / key
    git = ["git", "-c", "protocol.file.allow=always", "-c", "advice.detachedHead=false"]
    if (final / HF_PTQ).is_file():
        head = subprocess.run([*git, "-C", str(final), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        if head and (settings.commit is None or head == settings.commit):
            return final, head
        shutil.rmtree(final)
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache))
    try:
        for step in (["init", "--quiet", str(scratch)],
                     ["-C", str(scratch), "fetch", "--quiet", "--depth", "1", settings.repository,
                      f"refs/tags/{ref}" if not re.fullmatch(r"[0-9a-f]{40}", ref) else ref],
                     ["-C", str(scratch), "checkout", "--quiet", "--detach", "FETCH_HEAD"]):
            done = subprocess.run([*git, *step], capture_output=True, text=True, timeout=900)
            if done.returncode != 0 and "fetch" in step:  # a branch rather than a tag
                step[-1] = ref
                done = subprocess.run([*git, *step], capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise DeployError(f"fetching NVIDIA Model Optimizer {ref} from {settings.repository} "
                                  f"failed: {done.stderr.strip()[-500:]}\n  what to do: check [quantize] "
                                  "repository and ref in the lock, and the network")
        head = subprocess.run([*git, "-C", str(scratch), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        if settings.commit and head != settings.commit:
            raise DeployError(f"Model Optimizer {ref} is commit {head[:12]}, but the lock pins "
                              f"{settings.commit[:12]}\n  what to do: set [quantize] ref to the tag of "
                              "that commit, or update commit")
        if not (scratch / HF_PTQ).is_file():
            raise DeployError(f"Model Optimizer {ref} has no {HF_PTQ}; pick a ref that has it")
        shutil.rmtree(scratch / ".git", ignore_errors=True)
        (scratch / ".trtllm-deploy-commit").write_text(head)
        os.rename(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    # The checkout keeps no .git (it is mounted read-only, never changed); its commit is recorded.
    return final, head


def _checkout_commit(folder: Path) -> str:
    return (folder / ".trtllm-deploy-commit").read_text().strip()


def quantize(snapshot: Path, out: Path, precision: str, lockfile: LockFile, runner: Runner,
             cache: Path) -> dict:
    """``snapshot`` (a 16-bit Hugging Face checkpoint in the Hub cache) quantized to ``precision``
    into ``out``; returns the provenance to record."""
    if precision not in QUANT_ALGOS:
        raise InputError(f"quantizing makes {', '.join(QUANT_ALGOS)}, not {precision}")
    settings, image = lockfile.lock.quantize, runner.image
    installed = modelopt_version(image)
    if installed is None and not image.standin:
        raise DeployError(f"the runtime image {image.reference} has no nvidia-modelopt package (TensorRT-LLM "
                          "images carry it)\n  what to do: build the image from the lock (invoke image), "
                          "or use a published quantized variant (drop --quantize)")
    ref = settings.ref
    if ref == "auto":
        if installed is None:
            raise InputError(f"{lockfile.path}: [quantize] ref = \"auto\" takes Model Optimizer's version "
                             f"from the image, and {image.reference} has none; set ref to a Model Optimizer "
                             "tag")
        ref = installed
    elif installed is not None and installed.split("+")[0] != ref:
        raise InputError(f"{lockfile.path}: [quantize] ref is {ref}, but the image's nvidia-modelopt is "
                         f"{installed}: hf_ptq.py of one version does not run on the other\n"
                         f"  what to do: set [quantize] ref = \"{installed.split('+')[0]}\" (or \"auto\")")
    folder, commit = modelopt_checkout(settings, ref, cache / "modelopt")
    # The snapshot's files are links into the repository's blobs/: mount the whole repository.
    repo_root = snapshot.parent.parent
    inside = f"/opt/trtllm-deploy/hub/snapshots/{snapshot.name}"
    argv = ["python3", f"{MODELOPT_MOUNT}/{HF_PTQ}", "--pyt_ckpt_path", inside, "--qformat", precision,
            "--export_path", "/opt/trtllm-deploy/out", "--calib_size", str(settings.calib_size)]
    if settings.dataset:
        argv += ["--dataset", settings.dataset]
    if settings.kv_cache_qformat:
        argv += ["--kv_cache_qformat", settings.kv_cache_qformat]
    out.mkdir(parents=True, exist_ok=True)
    token = hub.token()  # calibration sets come from the Hub; the token never reaches argv
    runner.run(argv, [(repo_root, "/opt/trtllm-deploy/hub", True), (out, "/opt/trtllm-deploy/out", False),
                      (folder, MODELOPT_MOUNT, True)],
               f"quantizing to {precision} (Model Optimizer {ref})",
               env={"HF_TOKEN": token} if token else None)
    check_quantized(out, precision)
    return {"qformat": precision, "calib_size": settings.calib_size, "dataset": settings.dataset,
            "kv_cache_qformat": settings.kv_cache_qformat,
            "modelopt": {"repository": settings.repository, "ref": ref, "commit": commit,
                         "installed": installed}}


def quantize_inputs(lockfile: LockFile) -> dict:
    """What decides a quantized checkpoint, known before anything runs (for "up to date")."""
    settings = lockfile.lock.quantize
    return {"repository": settings.repository, "ref": settings.ref, "commit": settings.commit,
            "calib_size": settings.calib_size, "dataset": settings.dataset,
            "kv_cache_qformat": settings.kv_cache_qformat}


def check_quantized(folder: Path, precision: str) -> str:
    """The exported checkpoint has its config, weights and a quantization config naming ``precision``."""
    problems, algo = [], None
    for name, keys in (("hf_quant_config.json", ("quantization", "quant_algo")),
                       ("config.json", ("quantization_config", "quant_algo"))):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        algo = algo or (data.get(keys[0]) or {}).get(keys[1])
    if not (folder / "config.json").is_file():
        problems.append("no config.json")
    if not any(folder.glob("*.safetensors")):
        problems.append("no *.safetensors weights")
    if algo is None:
        problems.append("no quantization config (hf_quant_config.json or config.json quantization_config)")
    elif str(algo).upper() != QUANT_ALGOS[precision]:
        problems.append(f"quantized as {algo}, not {QUANT_ALGOS[precision]}")
    if problems:
        raise DeployError(f"the quantized checkpoint in {folder} is not usable: {'; '.join(problems)}")
    return str(algo)


# --- TensorRT engines ----------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineSettings:
    max_batch_size: int = 16
    max_input_len: int = 4096
    max_seq_len: int = 8192
    gemm_plugin: str = "auto"

    def check(self) -> None:
        for key in ("max_batch_size", "max_input_len", "max_seq_len"):
            if getattr(self, key) < 1:
                raise InputError(f"--{key.replace('_', '-')} must be at least 1")
        if self.max_seq_len < self.max_input_len:
            raise InputError(f"--max-seq-len ({self.max_seq_len}) must be at least --max-input-len "
                             f"({self.max_input_len}): a request's prompt and answer together")

    def as_dict(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "max_input_len": self.max_input_len,
                "max_seq_len": self.max_seq_len, "gemm_plugin": self.gemm_plugin}


def has_trtllm_build(image: Image) -> bool:
    return bool(_one_line(image, TRTLLM_BUILD))


def convert_script(image: Image, model_type: str) -> str:
    """The image's ``convert_checkpoint.py`` for ``model_type`` (new and old examples layouts)."""
    family = FAMILIES.get(model_type, model_type)
    if family is None:
        raise InputError(f"model_type {model_type!r} has no TensorRT-engine path; serve it with the "
                         "PyTorch backend (the default)")
    candidates = (f"{EXAMPLES}/models/core/{family}/convert_checkpoint.py",
                  f"{EXAMPLES}/models/contrib/{family}/convert_checkpoint.py",
                  f"{EXAMPLES}/{family}/convert_checkpoint.py")
    found = _one_line(image, FIRST_FILE, *candidates)
    if not found:
        raise DeployError(f"{image.reference} has no convert_checkpoint.py for model_type {model_type!r} "
                          "under "
                          f"{EXAMPLES}\n  what to do: serve it with the PyTorch backend (the default)")
    return found.splitlines()[0]


def tensorrt_engines(snapshot: Path, out: Path, precision: str, tp: int, settings: EngineSettings,
                     lockfile: LockFile, runner: Runner, work: Path) -> dict:
    """Engines for ``tp`` ranks in ``out`` (config.json, rank<N>.engine), with the tokenizer in
    ``out/tokenizer``; ``work`` holds the intermediate TensorRT-LLM checkpoint."""
    settings.check()
    config = json.loads((snapshot / "config.json").read_text())
    dtype = "float16" if str(config.get("torch_dtype") or config.get("dtype")) == "float16" else "bfloat16"
    repo_root, inside = snapshot.parent.parent, f"/opt/trtllm-deploy/hub/snapshots/{snapshot.name}"
    mounts = [(repo_root, "/opt/trtllm-deploy/hub", True), (work, "/opt/trtllm-deploy/work", False),
              (out, "/opt/trtllm-deploy/out", False)]
    checkpoint = "/opt/trtllm-deploy/work/checkpoint"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if precision in QUANT_ALGOS:
        script = f"{EXAMPLES}/quantization/quantize.py"
        argv = ["python3", script, "--model_dir", inside, "--output_dir", checkpoint, "--dtype", dtype,
                "--qformat", precision, "--kv_cache_dtype", "fp8", "--tp_size", str(tp),
                "--calib_size", str(lockfile.lock.quantize.calib_size)]
    else:
        script = convert_script(runner.image, str(config.get("model_type")))
        argv = ["python3", script, "--model_dir", inside, "--output_dir", checkpoint, "--dtype", dtype,
                "--tp_size", str(tp), "--workers", str(tp)]
    runner.run(argv, mounts, f"converting the checkpoint ({Path(script).name})")
    runner.run(["trtllm-build", "--checkpoint_dir", checkpoint, "--output_dir", "/opt/trtllm-deploy/out",
                "--gemm_plugin", settings.gemm_plugin, "--max_batch_size", str(settings.max_batch_size),
                "--max_input_len", str(settings.max_input_len), "--max_seq_len", str(settings.max_seq_len),
                "--workers", str(tp)], mounts, "trtllm-build")
    missing = [name for name in ("config.json", *(f"rank{rank}.engine" for rank in range(tp)))
               if not (out / name).is_file()]
    if missing:
        raise DeployError(f"trtllm-build finished but {out} lacks {', '.join(missing)} (log {runner.log})")
    tokenizer = out / "tokenizer"
    tokenizer.mkdir()
    for name in TOKENIZER_FILES:
        if (snapshot / name).is_file():
            shutil.copyfile(snapshot / name, tokenizer / name)
    return {"engine": settings.as_dict() | {"dtype": dtype, "script": script, "ranks": tp}}
