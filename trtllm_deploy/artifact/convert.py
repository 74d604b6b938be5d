"""Making an artifact inside the runtime image: quantizing, and TensorRT engines.

Both run the tools the pinned TensorRT-LLM image carries, in a container of that image on the
head's Docker engine and GPU (where the checkpoint was downloaded and the artifact store is),
reached through the head's target, so this machine needs neither Docker nor a GPU:

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
import posixpath
import re
import secrets as _random
from dataclasses import dataclass
from pathlib import Path

from trtllm_deploy.artifact import hub
from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.hosts import dockercli, scripts
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.targets import Target
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
MAKE_TIMEOUT = 48 * 3600.0  # quantizing a large checkpoint, or building its engines


@dataclass(frozen=True)
class Image(dockercli.LocalImage):
    """The runtime image as the head's Docker engine has it, and the head that has it."""

    target: Target | None = None


def head_image(target: Target, ref: str, needed_for: str | None = None) -> Image | None:
    """The image as the head's Docker engine has it; None when it has none (or no engine), unless
    ``needed_for`` says what needs it, which makes that an error with what to do."""
    done = target.run(["docker", "image", "inspect", "--format", "{{json .}}", ref], timeout=60,
                      check=False)
    if done.ok:
        return Image(**vars(dockercli.parse_image(ref, done.stdout)), target=target)
    if needed_for:
        raise DeployError(f"{needed_for} runs inside the runtime image {ref} on the head ({target.name}), "
                          "whose Docker engine does not have it\n  what to do: build it there (invoke "
                          "image), push it there, or pass --image REF of an image the head has")
    return None


def local_image(ref: str) -> dockercli.LocalImage | None:
    """The image as this machine's Docker engine has it, if it has one (deploy's push sends an image
    from here); what engine.build makes runs in the head's (:func:`head_image`)."""
    return dockercli.inspect_image(ref)


# Runs a step in a container and appends its output to the head's log: $1 the log, $2 the step as
# the log shows it, then the docker command.
RUN_LOGGED = Script("run a step in the runtime image",
                    'log=$1; shown=$2; shift 2\nmkdir -p -- "${log%/*}" || exit\n'
                    'printf \'$ %s\\n\' "$shown" >>"$log" || exit\nexec "$@" >>"$log" 2>&1',
                    timeout=MAKE_TIMEOUT)


@dataclass(frozen=True)
class Runner:
    """Runs the image's tools on the head: ``image``, the container ulimits (hosts.toml), one log
    for all steps (a path on the head)."""

    image: Image
    log: str
    ulimits: dict[str, str]

    def run(self, argv: list[str], mounts: list[tuple[str, str, bool]], what: str,
            env: dict[str, str] | None = None) -> None:
        run_in_image(self.image, argv, mounts, self.log, what, env, self.ulimits)


def run_in_image(image: Image, argv: list[str], mounts: list[tuple[str, str, bool]], log: str,
                 what: str, env: dict[str, str] | None = None,
                 ulimits: dict[str, str] | None = None) -> None:
    """``argv`` in a fresh container of ``image`` on the head with ``mounts`` (head path, container
    path, read-only), as the head's user (files it writes are the user's), output appended to
    ``log``. ``env`` values reach the container through the secret channel and docker's environment,
    never a command line."""
    target = image.target
    name = f"trtllm-deploy-make-{_random.token_hex(4)}"
    user = ":".join(target.run(["id", flag], timeout=60).stdout.strip() for flag in ("-u", "-g"))
    gpus = target.run(["docker", "info", "--format", "{{json .Runtimes}}"], timeout=60, check=False)
    command = ["docker", "run", "--rm", "--name", name, "--user", user, "--env", "HOME=/tmp", *SERVE_FLAGS,
               *(["--gpus", "all"] if '"nvidia"' in gpus.stdout else []),
               *(arg for key, value in (ulimits or {}).items() for arg in ("--ulimit", f"{key}={value}"))]
    for host, inside, read_only in mounts:
        command += ["--volume", f"{host}:{inside}:{'ro' if read_only else 'rw'}"]
    for key in env or {}:
        command += ["--env", key]  # the value comes from docker's own environment
    command += [image.reference, *argv]
    try:
        done = scripts.run(target, RUN_LOGGED, log, " ".join(argv), *command, check=False,
                           secrets=env or None)
    finally:
        # The docker client's end does not stop the container; this does (and is a no-op after
        # --rm removed it).
        target.run(["docker", "rm", "--force", name], timeout=120, check=False)
    if done.exit_code != 0:
        text = target.run(["tail", "-c", "65536", log], timeout=60, check=False).stdout
        raise DeployError(failures.explain(
            f"{what} failed in {image.reference} on {target.name} (exit {done.exit_code}; log {log})", text))


# Looks inside the image, each in a throwaway container of it (its entrypoint bypassed).
MODELOPT_VERSION = Script("read the image's Model Optimizer version",
                          "python3 -c \"import importlib.metadata as m; print(m.version('nvidia-modelopt'))\""
                          " 2>/dev/null")
TRTLLM_BUILD = Script("look for trtllm-build in the image", "command -v trtllm-build")
FIRST_FILE = Script("look for the model's convert_checkpoint.py in the image",
                    'for f do if [ -f "$f" ]; then echo "$f"; break; fi; done')


def _one_line(image: Image, script: Script, *args: str) -> str:
    shell, *rest = script.argv(args)
    done = image.target.run(["docker", "run", "--rm", "--entrypoint", shell, image.reference, *rest],
                            check=False, timeout=300)
    return done.stdout.strip() if done.ok else ""


# --- quantizing with Model Optimizer ------------------------------------------------------------

def modelopt_version(image: Image) -> str | None:
    return _one_line(image, MODELOPT_VERSION) or None


# The Model Optimizer tree at a tag or branch, fetched once into the head's cache (without .git, its
# commit recorded beside it) and reused. $1 the folder, $2 repository, $3 ref, $4 the pinned commit
# (or ""), $5 hf_ptq.py's path in the tree. Exits 3: fetch failed, 4: another commit, 5: no hf_ptq.
MODELOPT_CHECKOUT = Script("fetch NVIDIA Model Optimizer", r'''final=$1 repo=$2 ref=$3 want=$4 ptq=$5
if [ -f "$final/$ptq" ] && [ -f "$final/.trtllm-deploy-commit" ]; then
  head=$(cat "$final/.trtllm-deploy-commit")
  if [ -z "$want" ] || [ "$head" = "$want" ]; then mark commit; echo "$head"; exit 0; fi
  rm -rf -- "$final"
fi
mkdir -p -- "${final%/*}" && scratch=$(mktemp -d -p "${final%/*}") || exit
trap 'rm -rf -- "$scratch"' EXIT
g() { git -c protocol.file.allow=always -c advice.detachedHead=false -C "$scratch" "$@"; }
git init --quiet "$scratch" || exit
g fetch --quiet --depth 1 "$repo" "refs/tags/$ref" 2>/dev/null ||
  g fetch --quiet --depth 1 "$repo" "$ref" || exit 3
g checkout --quiet --detach FETCH_HEAD || exit 3
head=$(g rev-parse HEAD)
mark commit; echo "$head"
if [ -n "$want" ] && [ "$head" != "$want" ]; then exit 4; fi
[ -f "$scratch/$ptq" ] || exit 5
rm -rf -- "$scratch/.git" && echo "$head" >"$scratch/.trtllm-deploy-commit" || exit
mv -- "$scratch" "$final" || exit
trap - EXIT''', timeout=900)


def modelopt_checkout(target: Target, settings: Quantize, ref: str, cache: str) -> tuple[str, str]:
    """The Model Optimizer tree at ``ref`` (and at ``settings.commit`` when the lock pins one) on the
    head, fetched once into ``cache`` and reused; returns its folder and commit."""
    final = posixpath.join(cache, re.sub(r"[^A-Za-z0-9_.-]", "_", f"{ref}-{settings.commit or 'ref'}"))
    done = scripts.run(target, MODELOPT_CHECKOUT, final, settings.repository, ref, settings.commit or "",
                       HF_PTQ, check=False)
    head = done.sections.get("commit", "").strip()
    if done.exit_code == 4:
        raise DeployError(f"Model Optimizer {ref} is commit {head[:12]}, but the lock pins "
                          f"{settings.commit[:12]}\n  what to do: set [quantize] ref to the tag of "
                          "that commit, or update commit")
    if done.exit_code == 5:
        raise DeployError(f"Model Optimizer {ref} has no {HF_PTQ}; pick a ref that has it")
    if done.exit_code != 0:
        said = " ".join(done.stderr.strip().splitlines()[-3:])
        raise DeployError(f"fetching NVIDIA Model Optimizer {ref} from {settings.repository} on "
                          f"{target.name} failed: {said[-500:]}\n  what to do: check [quantize] repository "
                          "and ref in the lock, and the head's network")
    return final, head


def quantize(snapshot: str, out: str, precision: str, lockfile: LockFile, runner: Runner,
             cache: str) -> dict:
    """``snapshot`` (a 16-bit Hugging Face checkpoint in the head's Hub cache) quantized to
    ``precision`` into ``out`` (on the head); returns the provenance to record."""
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
    target = image.target
    folder, commit = modelopt_checkout(target, settings, ref, posixpath.join(cache, "modelopt"))
    # The snapshot's files are links into the repository's blobs/: mount the whole repository.
    repo_root = posixpath.dirname(posixpath.dirname(snapshot))
    inside = f"/opt/trtllm-deploy/hub/snapshots/{posixpath.basename(snapshot)}"
    argv = ["python3", f"{MODELOPT_MOUNT}/{HF_PTQ}", "--pyt_ckpt_path", inside, "--qformat", precision,
            "--export_path", "/opt/trtllm-deploy/out", "--calib_size", str(settings.calib_size)]
    if settings.dataset:
        argv += ["--dataset", settings.dataset]
    if settings.kv_cache_qformat:
        argv += ["--kv_cache_qformat", settings.kv_cache_qformat]
    target.run(["mkdir", "-p", out], timeout=60)
    token = hub.token()  # calibration sets come from the Hub; the token never reaches argv
    runner.run(argv, [(repo_root, "/opt/trtllm-deploy/hub", True), (out, "/opt/trtllm-deploy/out", False),
                      (folder, MODELOPT_MOUNT, True)],
               f"quantizing to {precision} (Model Optimizer {ref})",
               env={"HF_TOKEN": token} if token else None)
    check_quantized_on(target, out, precision)
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


# $1 the exported checkpoint: its file names, then each quantization config's text.
LOOK_EXPORT = Script("read the quantized checkpoint's configs",
                     'cd -- "$1" || exit\nmark names; ls -1A\n'
                     'for f in hf_quant_config.json config.json; do\n'
                     '  mark "$f"; cat -- "$f" 2>/dev/null\ndone; true')


def check_quantized_on(target: Target, folder: str, precision: str) -> str:
    """:func:`check_quantized` of a folder on the head."""
    seen = scripts.run(target, LOOK_EXPORT, folder)
    return judge_quantized(folder, seen.lines("names"),
                           {name: seen.sections.get(name, "") for name in ("hf_quant_config.json",
                                                                           "config.json")}, precision)


def check_quantized(folder: Path, precision: str) -> str:
    """:func:`judge_quantized` of a folder on this machine."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    texts = {name: (folder / name).read_text() for name in ("hf_quant_config.json", "config.json")
             if (folder / name).is_file()}
    return judge_quantized(str(folder), names, texts, precision)


def judge_quantized(folder: str, names: list[str], texts: dict[str, str], precision: str) -> str:
    """The exported checkpoint has its config, weights and a quantization config naming ``precision``."""
    problems, algo = [], None
    for name, keys in (("hf_quant_config.json", ("quantization", "quant_algo")),
                       ("config.json", ("quantization_config", "quant_algo"))):
        try:
            data = json.loads(texts.get(name) or "")
        except ValueError:
            continue
        algo = algo or (data.get(keys[0]) or {}).get(keys[1])
    if "config.json" not in names:
        problems.append("no config.json")
    if not any(name.endswith(".safetensors") for name in names):
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


# $1 the tokenizer folder to make, $2 the snapshot, then the file names to copy where it has them.
COPY_TOKENIZER = Script("copy the tokenizer beside the engines",
                        'dest=$1; src=$2; shift 2; mkdir -- "$dest" || exit\n'
                        'for f do if [ -f "$src/$f" ]; then cp -L -- "$src/$f" "$dest/$f" || exit; fi; done')


def tensorrt_engines(snapshot: str, out: str, precision: str, tp: int, settings: EngineSettings,
                     lockfile: LockFile, runner: Runner, work: str) -> dict:
    """Engines for ``tp`` ranks in ``out`` (config.json, rank<N>.engine), with the tokenizer in
    ``out/tokenizer``; ``work`` holds the intermediate TensorRT-LLM checkpoint (all on the head)."""
    settings.check()
    target = runner.image.target
    config = json.loads(target.run(["cat", posixpath.join(snapshot, "config.json")], timeout=60).stdout)
    dtype = "float16" if str(config.get("torch_dtype") or config.get("dtype")) == "float16" else "bfloat16"
    repo_root = posixpath.dirname(posixpath.dirname(snapshot))
    inside = f"/opt/trtllm-deploy/hub/snapshots/{posixpath.basename(snapshot)}"
    mounts = [(repo_root, "/opt/trtllm-deploy/hub", True), (work, "/opt/trtllm-deploy/work", False),
              (out, "/opt/trtllm-deploy/out", False)]
    checkpoint = "/opt/trtllm-deploy/work/checkpoint"
    target.run(["mkdir", "-p", work, out], timeout=60)
    if precision in QUANT_ALGOS:
        script = f"{EXAMPLES}/quantization/quantize.py"
        argv = ["python3", script, "--model_dir", inside, "--output_dir", checkpoint, "--dtype", dtype,
                "--qformat", precision, "--kv_cache_dtype", "fp8", "--tp_size", str(tp),
                "--calib_size", str(lockfile.lock.quantize.calib_size)]
    else:
        script = convert_script(runner.image, str(config.get("model_type")))
        argv = ["python3", script, "--model_dir", inside, "--output_dir", checkpoint, "--dtype", dtype,
                "--tp_size", str(tp), "--workers", str(tp)]
    runner.run(argv, mounts, f"converting the checkpoint ({posixpath.basename(script)})")
    runner.run(["trtllm-build", "--checkpoint_dir", checkpoint, "--output_dir", "/opt/trtllm-deploy/out",
                "--gemm_plugin", settings.gemm_plugin, "--max_batch_size", str(settings.max_batch_size),
                "--max_input_len", str(settings.max_input_len), "--max_seq_len", str(settings.max_seq_len),
                "--workers", str(tp)], mounts, "trtllm-build")
    made = set(target.run(["ls", "-1A", out], timeout=60).stdout.split())
    missing = [name for name in ("config.json", *(f"rank{rank}.engine" for rank in range(tp)))
               if name not in made]
    if missing:
        raise DeployError(f"trtllm-build finished but {out} lacks {', '.join(missing)} (log {runner.log})")
    scripts.run(target, COPY_TOKENIZER, posixpath.join(out, "tokenizer"), snapshot, *TOKENIZER_FILES)
    return {"engine": settings.as_dict() | {"dtype": dtype, "script": script, "ranks": tp}}
