"""``invoke engine.build`` run on this machine (which is not a node) with the head, spark-1 of the
testbed, reached over SSH: the download happens on the head, into its Hugging Face cache, and the
artifact is made in its store; this machine keeps nothing.

The Hub is tests/fakehub.py listening on the testbed network's gateway (this machine), so the head
downloads from it as a Spark would from the Hub; traffic stays on this machine and the testbed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import docker_unusable
from fakehub import FakeHub, Repo, hub_env, model_entry
from waiting import until

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_headTokenNeverInArgv0123456789abcdef"
CACHE = "~/.cache/huggingface/hub"      # the head's paths.model_cache (the testbed's default), hub/
STORE = "~/trtllm-deploy/engines"       # the head's paths.artifacts

needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


def checkpoint(weights: int) -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}',
            "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
            "model.safetensors": os.urandom(weights), "pytorch_model.bin": b"not for serving"}


def sha(word: str) -> str:
    return hashlib.sha1(word.encode()).hexdigest()


# One repository per test (the testbed is shared by the session): name → (repo, revision).
REPOS = {name: (f"org/{name}", sha(name)) for name in ("plain", "twice", "cut", "badlfs", "badjson",
                                                        "gated")}


@pytest.fixture(scope="module")
def bed(testbed):
    return testbed[0]


@pytest.fixture
def hub(bed):
    # The bridge's address on this machine: the one docker gives it, else the subnet's first.
    gateway = subprocess.run(["docker", "network", "inspect", "--format",
                              "{{range .IPAM.Config}}{{.Gateway}}{{end}}", bed.layout.network],
                             capture_output=True, text=True, check=True).stdout.strip() or \
        str(ipaddress.IPv4Network(bed.layout.subnet).network_address + 1)
    server = FakeHub({repo: Repo(repo, revision, checkpoint(3 << 20 if name != "twice" else 2 << 20),
                                 token=TOKEN if name == "gated" else None)
                      for name, (repo, revision) in REPOS.items()}, host="0.0.0.0", address=gateway)
    server.url = server.start()
    yield server
    server.stop()


@pytest.fixture
def engine(bed, hub, tmp_path):
    """``invoke engine.build`` on this machine, its own Hugging Face folders empty and watched, its
    Docker engine out of reach."""
    models = tmp_path / "models.toml"
    models.write_text("".join(model_entry(name, repo, revision) for name, (repo, revision) in REPOS.items()))
    lock = tmp_path / "lock.toml"
    lock.write_text((ROOT / "requirements" / "tensorrt-llm.lock.toml").read_text())
    here = {"home": tmp_path / "hf-home", "cache": tmp_path / "hf-cache"}
    for folder in here.values():
        folder.mkdir()
    # No Docker engine here either: whatever engine.build asks of Docker, the head's answers.
    env = hub_env(hub.url, tmp_path, HF_HUB_CACHE=str(here["cache"]), DOCKER_HOST="unix:///nonexistent")
    assert env["HF_HOME"] == str(here["home"])

    def start(model: str, token: str | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "engine.build", "--model", model,
             "--models-file", str(models), "--hosts", str(bed.layout.hosts_file), "--lock", str(lock),
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env | ({"HF_TOKEN": token} if token else {}))

    def run(model: str, token: str | None = None) -> tuple[int, str, str]:
        proc = start(model, token)
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err

    run.start = start
    yield run
    # Whatever happened, nothing of the checkpoint was written on this machine.
    assert [list(folder.iterdir()) for folder in here.values()] == [[], []]


def head_sh(bed, script: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", "exec", "-u", "spark", bed.layout.container(1), "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 or not check, done.stderr
    return done


def bodies(hub, repo: str) -> dict[str, int]:
    """GETs of each file of ``repo`` the fake Hub answered."""
    counted: dict[str, int] = {}
    for seen in hub.seen:
        if seen.method == "GET" and seen.path.startswith(f"/{repo}/resolve/"):
            name = seen.path.rsplit("/", 1)[1]
            counted[name] = counted.get(name, 0) + 1
    return counted


@needs_docker
def test_the_checkpoint_and_the_artifact_are_on_the_head_and_up_to_date_the_second_time(bed, hub, engine):
    repo, revision = REPOS["plain"]
    code, out, err = engine("plain")
    assert code == 0, err
    report = json.loads(out)
    assert report["action"] == "built" and report["node"] == "spark-1"
    name = Path(report["path"]).name
    assert report["path"] == head_sh(bed, f"echo {STORE}/{name}").stdout.strip()
    # The head's Hub cache, in the Hub's layout: snapshot links into blobs named by their hashes.
    weights = hub.repos[repo].files["model.safetensors"]
    link = f"{CACHE}/models--org--plain/snapshots/{revision}/model.safetensors"
    assert head_sh(bed, f"readlink {link}").stdout.strip() == \
        f"../../blobs/{hashlib.sha256(weights).hexdigest()}"
    assert head_sh(bed, f"sha256sum < {link}").stdout.split()[0] == hashlib.sha256(weights).hexdigest()
    assert head_sh(bed, f"ls {CACHE}/models--org--plain/snapshots/{revision}").stdout.split() == [
        "config.json", "model.safetensors", "tokenizer.json"]
    # The artifact: hard-linked from those blobs, verified on the head by engine.verify.
    assert head_sh(bed, f"stat -c %h {STORE}/{name}/model.safetensors").stdout.strip() == "2"
    verified = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "engine.verify",
                               "--name", name, "--hosts", str(bed.layout.hosts_file), "--nodes", "spark-1",
                               "--json"], capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and json.loads(verified.stdout)["nodes"]["spark-1"]["ok"], verified.stderr
    assert head_sh(bed, f"ls -A {STORE} | grep '^\\.{name}' || true").stdout == ""  # nothing half-made
    # The runtime image it records is the one the head's Docker engine has.
    made = json.loads(head_sh(bed, f"cat {STORE}/{name}/trtllm-deploy-manifest.json").stdout)
    image = made["provenance"]["image"]
    assert image["id"] and image["id"] == head_sh(
        bed, f"docker image inspect --format '{{{{.Id}}}}' {image['ref']}").stdout.strip()

    code, out, err = engine("plain")
    assert code == 0 and json.loads(out)["action"] == "up to date", err
    assert bodies(hub, repo) == {"config.json": 1, "model.safetensors": 1, "tokenizer.json": 1}


@needs_docker
def test_two_builds_at_once_download_each_file_once(bed, hub, engine):
    repo, _ = REPOS["twice"]
    hub.bytes_per_second = 256 << 10  # eight seconds for the weights
    first = engine.start("twice")
    blobs = f"{CACHE}/models--org--twice/blobs"
    until(lambda: head_sh(bed, f"ls {blobs} 2>/dev/null", check=False).stdout, 60,
          "the first build to write a .part (or to end)",
          done=lambda listing: ".part" in listing or first.poll() is not None)
    second = engine.start("twice")  # while the first is writing its .part
    results = [(proc.wait(timeout=300), *proc.communicate()) for proc in (first, second)]
    for code, out, err in results:
        assert code == 0, err
        assert json.loads(out)["action"] in ("built", "up to date")
    assert bodies(hub, repo) == {"config.json": 1, "model.safetensors": 1, "tokenizer.json": 1}
    assert ".part" not in head_sh(bed, f"ls -A {CACHE}/models--org--twice/blobs").stdout
    assert head_sh(bed, f"ls {CACHE}/.locks/models--org--twice").stdout.count(".lock") == 3


@needs_docker
def test_a_download_cut_off_midway_resumes_from_where_it_stopped(bed, hub, engine):
    repo, _ = REPOS["cut"]
    hub.cut_once = {"model.safetensors"}
    code, out, err = engine("cut")
    assert code == 0, err
    ranges = [s.headers.get("range") for s in hub.seen if s.path.endswith("/model.safetensors")]
    size = len(hub.repos[repo].files["model.safetensors"])
    assert ranges[0] is None and ranges[1] == f"bytes={size // 2}-", ranges  # went on, not over
    assert bodies(hub, repo)["model.safetensors"] == 2


@needs_docker
@pytest.mark.parametrize("model, file, what", [("badlfs", "model.safetensors", "sha256"),
                                               ("badjson", "config.json", "git blob id")])
def test_a_file_that_is_not_what_the_hub_lists_is_refused_and_named(bed, hub, engine, model, file, what):
    repo, _ = REPOS[model]
    hub.corrupt = {file}
    code, out, err = engine(model)
    assert code == 1 and f"{file} does not match the {what} the Hub lists" in err, err
    assert "Traceback" not in err
    blobs = head_sh(bed, f"ls -A {CACHE}/models--org--{model}/blobs").stdout.split()
    assert not [b for b in blobs if b.endswith(".part")] and len([b for b in blobs if "." not in b]) == 2
    assert head_sh(bed, f"ls {STORE} | grep '^{model}-' || true").stdout == ""
    hub.corrupt = set()
    code, out, err = engine(model)  # fetched anew, only the refused file
    assert code == 0, err
    assert bodies(hub, repo)[file] == 2 and sum(bodies(hub, repo).values()) == 4


@needs_docker
def test_the_token_reaches_the_hub_as_a_header_and_never_an_argument_on_the_head(bed, hub, engine):
    repo, _ = REPOS["gated"]
    refused, _, err = engine("gated")
    assert refused == 1 and "gated or private" in err
    hub.bytes_per_second = 1 << 20  # three seconds of weights, to look at the head meanwhile
    proc = engine.start("gated", TOKEN)
    deadline, seen = time.monotonic() + 120, []
    while time.monotonic() < deadline and proc.poll() is None:
        listing = head_sh(bed, "ps -eo args", check=False).stdout
        seen += [line for line in listing.splitlines() if "headagent" in line and " fetch " in line]
        try:
            proc.wait(timeout=0.1)  # the next look, unless the build has ended meanwhile
        except subprocess.TimeoutExpired:
            pass
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert seen and not [line for line in seen if TOKEN in line]
    assert TOKEN not in out + err
    files = [s for s in hub.seen if s.method == "GET" and s.path.startswith(f"/{repo}/resolve/")]
    assert files and all(s.headers.get("authorization") == f"Bearer {TOKEN}" for s in files)
    assert not any(TOKEN in s.path for s in hub.seen)
    # Nothing the head keeps names it: its staging folder, the cache and the store.
    assert head_sh(bed, f"grep -rl {TOKEN} ~/.cache ~/trtllm-deploy || true").stdout == ""


@needs_docker
def test_quantizing_runs_in_the_runtime_image_on_the_head(bed, hub, tmp_path):
    """Model Optimizer's hf_ptq.py (the stand-in's, in a repository on the head) runs in the head's
    runtime image on its Docker engine; the token reaches the container, never a log or argument."""
    repo, revision = REPOS["plain"]
    commit = head_sh(bed, "set -e; rm -rf ~/modelopt; mkdir -p ~/modelopt/examples/llm_ptq; cd ~/modelopt\n"
                          "printf 'import sys\\n\\n"
                          "from trtllm_deploy.testbed.standin.build import hf_ptq\\n\\n"
                          "sys.exit(hf_ptq(sys.argv[1:]))\\n' > examples/llm_ptq/hf_ptq.py\n"
                          "git init -q . && git add -A && git -c user.name=t -c user.email=t@example.invalid "
                          "commit -qm hf_ptq && git tag 9.9.9 && git rev-parse HEAD").stdout.strip()
    home = head_sh(bed, "echo $HOME").stdout.strip()
    models = tmp_path / "models.toml"
    models.write_text(model_entry("plain", repo, revision) + '[models.plain.variants.nvfp4]\n'
                      'quantize_from = "bf16"\nbytes_per_param = 0.6\ntp_by_nodes = { 1 = 1 }\n')
    lock = tmp_path / "lock.toml"
    lock.write_text((ROOT / "requirements" / "tensorrt-llm.lock.toml").read_text()
                    + f'\n[quantize]\nrepository = "file://{home}/modelopt"\nref = "9.9.9"\n'
                      'calib_size = 16\n')
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "engine.build", "--model", "plain",
         "--precision", "nvfp4", "--models-file", str(models), "--hosts", str(bed.layout.hosts_file),
         "--lock", str(lock), "--json"], capture_output=True, text=True, timeout=300,
        env=hub_env(hub.url, tmp_path, HF_TOKEN=TOKEN, DOCKER_HOST="unix:///nonexistent"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    name = Path(report["path"]).name
    assert report["node"] == "spark-1" and name.startswith("plain-nvfp4-quantized-tp1-")
    quant = json.loads(head_sh(bed, f"cat {STORE}/{name}/hf_quant_config.json").stdout)
    assert quant["quantization"]["quant_algo"] == "NVFP4"
    made = json.loads(head_sh(bed, f"cat {STORE}/{name}/trtllm-deploy-manifest.json").stdout)
    assert made["provenance"]["quantized"]["run"]["modelopt"]["commit"] == commit
    log = head_sh(bed, f"cat {STORE}/.logs/{name}.log").stdout
    assert "calibrating on 16 samples" in log and TOKEN not in log + done.stdout + done.stderr
    assert head_sh(bed, "docker ps -a --filter name=trtllm-deploy-make- --format '{{.Names}}'").stdout == ""


def test_build_dry_run_plans_on_the_head_and_writes_nothing(sshd_factory, hosts_file, tmp_path):
    """The plan reads the node's memory (a look) and writes nothing there: no download, no artifact."""
    server = sshd_factory(home=True)
    models = tmp_path / "models.toml"
    models.write_text(model_entry("tiny", "org/tiny", sha("tiny")))
    done = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "engine.build",
                           "--model", "tiny", "--models-file", str(models), "--hosts",
                           str(hosts_file([server])), "--lock", str(ROOT / "requirements" /
                           "tensorrt-llm.lock.toml"), "--dry-run", "--json"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path), "DOCKER_HOST": "unix:///nonexistent"})
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["dry_run"] and plan["task"] == "engine.build" and plan["artifact"]
    actions = [step["action"] for step in plan["steps"] if step["node"] == "node-0"]
    assert actions[0].startswith(f"download {plan['repo']} @ ")
    assert f"make {plan['artifact']} in" in actions[-1]
    assert "Accepted publickey" in server.log                 # it looked ...
    assert list(server.home.iterdir()) == []                  # ... and wrote nothing
