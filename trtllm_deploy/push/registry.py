"""An image to other nodes from the node that holds it, through a registry on that node's loopback.

The holder (the build node, say) runs the Distribution registry (Debian and Ubuntu's
``docker-registry``) bound to 127.0.0.1 only, and ``docker push``es the image into it; every other
node opens an SSH tunnel from its own loopback to that port (``hosts/hop.py``: over the fabric where
set) and ``docker pull``s from ``127.0.0.1:PORT``. Docker allows plain HTTP to registries on
127.0.0.0/8 without any setting (docs/SOURCES.md), and nothing listens beyond loopback.

A pull skips, the documented way, each layer the engine knows by its registry digest: every layer
it pulled from this registry before. A layer it got otherwise (``docker load``, a local build) is
fetched once more on its first pull (measured on 20.10; docs/SOURCES.md), so the bytes reported are
what ``docker pull`` says it fetched, not what the plan expected. The registry's storage stays on
the holder between runs, so the layers keep their digests and are not uploaded again.

Use: :func:`inspect` the image on the holder, ``layers.look`` each receiving node, and only if one
needs layers, ``with serve(...) as served:`` then :func:`pull` on each (``fan_out``);
:func:`distribute` does exactly that.
"""

from __future__ import annotations

import json
import random
import re
import secrets as _random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts import hop, scripts
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.dockercli import LocalImage, parse_image
from trtllm_deploy.hosts.fanout import GroupResult, Outcome, fan_out
from trtllm_deploy.hosts.inventory import Node
from trtllm_deploy.hosts.scripts import Script, StepFailed
from trtllm_deploy.hosts.targets import Target, expand
from trtllm_deploy.push import layers
from trtllm_deploy.push.layers import LOAD_TIMEOUT, ImagePlan, ImageSent

NAMESPACE = "trtllm-deploy"  # every repository the registry holds is under it
# A repository path as the registry accepts it: lowercase components joined by "/".
REPOSITORY = re.compile(r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*")
LIFETIME = 6 * 3600  # a registry whose owner died (no stop) ends by itself after this many seconds
START_TIMEOUT = 30.0
# A pulling node's end of the tunnel: a port below Linux's ephemeral range (32768-60999), so it
# rarely meets another program's; one that is taken is tried again with another (ssh says so).
LOCAL_PORTS = (20000, 32000)
PORT_ATTEMPTS = 5
PORT_IN_USE, NO_TUNNEL, NO_REGISTRY = 75, 76, 70  # exit codes of the scripts below

# http.addr port 0: the kernel picks a free port when the registry binds, and the registry logs
# the address it got ("listening on 127.0.0.1:PORT"): no window in which another program takes it.
# The storage folder comes in REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY (the registry reads any
# setting from REGISTRY_<SECTION>_<KEY>), so no path is ever written into YAML.
CONFIG = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: /nonexistent
  delete:
    enabled: true
http:
  addr: 127.0.0.1:0
"""
# $1 the http URL; exits 0 once it answers 200. Python 3 is on every node (push's agent needs it).
PROBE = 'python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" '

# $1 this run's folder, $2 the storage folder, $3 the lifetime in seconds, $4 the config text.
# Folders of earlier runs whose registry is gone are removed; a live one is another run's (or one
# whose owner died: its lifetime ends it), one without a pid yet is another run starting.
START = Script("start the image registry", """
command -v docker-registry >/dev/null 2>&1 || exit 70
for old in "$(dirname "$1")"/run-*; do
  [ -f "$old/pid" ] || continue
  kill -0 "-$(cat "$old/pid")" 2>/dev/null || rm -rf "$old"
done
mkdir -p "$1" "$2" && printf '%s' "$4" > "$1/config.yml"
REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY="$2" \\
  setsid timeout "$3" docker-registry serve "$1/config.yml" > "$1/log" 2>&1 < /dev/null &
echo $! > "$1/pid"
port= tries=0
while [ -z "$port" ]; do
  kill -0 $! 2>/dev/null || { tail -n 5 "$1/log" >&2; exit 71; }
  tries=$((tries + 1)); [ $tries -gt 200 ] && { echo "it did not start listening" >&2; exit 72; }
  port=$(sed -n 's/.*listening on 127\\.0\\.0\\.1:\\([0-9][0-9]*\\).*/\\1/p' "$1/log" | head -n 1)
  [ -n "$port" ] || sleep 0.1
done
tries=0
until """ + PROBE + """"http://127.0.0.1:$port/v2/" 2>/dev/null; do
  tries=$((tries + 1)); [ $tries -gt 200 ] && { echo "/v2/ did not answer" >&2; exit 73; }
  sleep 0.1
done
mark port
echo "$port"
""", timeout=START_TIMEOUT)

# $1 the image, $2 its name in the registry (127.0.0.1:PORT/trtllm-deploy/REPO:TAG), $3 the URL of
# that manifest. Prints the manifest the registry now holds, with its digest first.
PUSH = Script("push the image into the registry", """
docker tag "$1" "$2" && docker push "$2" >&2 || exit 1
mark manifest
python3 - "$3" <<'EOF'
import sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={
    "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
with urllib.request.urlopen(request, timeout=30) as answer:
    print(answer.headers["Docker-Content-Digest"])
    print(answer.read().decode())
EOF
""", timeout=LOAD_TIMEOUT)

# $1 this run's folder, $2 the image's name in the registry. Untags only that name (the image keeps
# its own), then ends the registry's process group and waits until it is gone.
STOP = Script("stop the image registry", """
docker image rm "$2" > /dev/null 2>&1
[ -f "$1/pid" ] || exit 0
group=$(cat "$1/pid")
kill -TERM "-$group" 2>/dev/null
tries=0
while kill -0 "-$group" 2>/dev/null; do
  tries=$((tries + 1))
  [ $tries -eq 50 ] && kill -KILL "-$group" 2>/dev/null
  [ $tries -gt 100 ] && { echo "the registry (process group $group) did not stop" >&2; exit 1; }
  sleep 0.1
done
rm -rf "$1"
""", timeout=30)

# $1 the name to pull (127.0.0.1:LPORT/...@sha256:DIGEST), $2 the image's own reference, $3 LPORT,
# then the tunnel's ssh command. Whatever happens, the tunnel ends with the script (trap).
PULL = Script("pull the image from the holder's registry", """
name=$1 reference=$2 port=$3; shift 3
said=$(mktemp)
"$@" 2> "$said" < /dev/null &
tunnel=$!
trap 'kill $tunnel 2>/dev/null; wait $tunnel 2>/dev/null; rm -f "$said"' EXIT
trap 'exit 130' INT TERM HUP
tries=0
until """ + PROBE + """"http://127.0.0.1:$port/v2/" 2>/dev/null; do
  if ! kill -0 $tunnel 2>/dev/null; then
    grep -Eq 'Address already in use|cannot listen to port' "$said" && exit 75
    tail -n 3 "$said" >&2; exit 76
  fi
  tries=$((tries + 1)); [ $tries -gt 300 ] && { echo "the tunnel did not answer" >&2; exit 76; }
  sleep 0.1
done
kill -0 $tunnel 2>/dev/null || { tail -n 3 "$said" >&2; exit 76; }
mark pull
docker pull "$name" || exit 1
docker tag "$name" "$reference" && docker image rm "$name" > /dev/null
""", timeout=LOAD_TIMEOUT)

INSPECT = Script("look at the image", """
docker image inspect --format '{{json .}}' "$1" 2>/dev/null || exit 3
""", timeout=60)


@dataclass(frozen=True)
class Served:
    """An image in a registry on its holder's loopback, ready to be pulled through a tunnel."""

    holder: Node
    image: LocalImage
    port: int                      # the registry's port on the holder's 127.0.0.1
    repository: str                # trtllm-deploy/REPO, in that registry
    digest: str                    # the manifest's digest, as pushed
    layer_digests: tuple[str, ...]  # compressed layers, in the image's layer order
    layer_sizes: tuple[int, ...]

    def pull_name(self, local_port: int) -> str:
        return f"127.0.0.1:{int(local_port)}/{self.repository}@{self.digest}"


def repository_and_tag(reference: str) -> tuple[str, str]:
    """Where an image goes in the registry: ``nvcr.io/nvidia/x:1.0`` → (``trtllm-deploy/nvidia/x``,
    ``1.0``). The source registry's host is dropped; an image pinned by digest is tagged by it."""
    name, _, pinned = reference.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = "latest"
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    if pinned:
        tag = pinned.split(":")[-1][:32]
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    repository = "/".join(parts).lower()
    named_by_id = reference.startswith("sha256:") or re.fullmatch(r"[0-9a-f]{64}", reference)
    if named_by_id or not REPOSITORY.fullmatch(repository):
        raise InputError(f"image {reference}: not an image name a registry can hold; name the image "
                         "by repository and tag (REPO:TAG), not by ID")
    return f"{NAMESPACE}/{repository}", tag


def find(node: Node, target: Target, reference: str) -> LocalImage | None:
    """The image as ``node``'s engine has it, or None when it has no such image."""
    repository_and_tag(reference)  # an ID or a malformed name is refused before anything runs
    ran = scripts.run(target, INSPECT, reference, check=False)
    if ran.exit_code == 3:
        return None
    if not ran.ok:
        raise StepFailed(node.name, INSPECT.step, ran.result)
    return parse_image(reference, ran.stdout)


def inspect(node: Node, target: Target, reference: str) -> LocalImage:
    """The image as the holding node's engine has it; CheckFailed when it is not there."""
    found = find(node, target, reference)
    if found is None:
        raise CheckFailed(f"image {reference} is not on {node.name}: build it there (invoke image) "
                          "or pull it there")
    return found


def parse_manifest(text: str, image: LocalImage) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
    """PUSH's manifest section → (its digest, each layer's compressed digest and size)."""
    digest, _, body = text.strip().partition("\n")
    manifest = json.loads(body)
    found = manifest.get("layers") or []
    if len(found) != len(image.diff_ids):
        raise CheckFailed(f"the registry's manifest of {image.reference} lists {len(found)} layers, "
                          f"the image has {len(image.diff_ids)}")
    return (digest.strip(), tuple(layer["digest"] for layer in found),
            tuple(int(layer["size"]) for layer in found))


@contextmanager
def serve(node: Node, target: Target, image: LocalImage, *,
          lifetime: int = LIFETIME) -> Iterator[Served]:
    """The image pushed into a registry started on ``node``'s loopback; on leaving (an error and
    Ctrl-C included) the registry is stopped and its name for the image removed (the image stays)."""
    home = target.home()
    base = expand(node.paths.state, home) + "/registry"
    run = f"{base}/run-{_random.token_hex(6)}"
    repository, tag = repository_and_tag(image.reference)
    name, failed = "", True
    try:  # from the start: a registry started when Ctrl-C came is stopped too
        started = scripts.run(target, START, run, f"{base}/storage", int(lifetime), CONFIG, check=False)
        if started.exit_code == NO_REGISTRY:
            raise CheckFailed(f"{node.name} has no docker-registry (the Distribution registry) to "
                              f"serve {image.reference} to the other nodes from: install it there "
                              "(sudo apt install docker-registry) and try again; the package's own "
                              "service is not used (sudo systemctl disable --now docker-registry)")
        if not started.ok:
            raise StepFailed(node.name, START.step, started.result)
        port = int(started.sections["port"].strip())
        name = f"127.0.0.1:{port}/{repository}:{tag}"
        pushed = scripts.run(target, PUSH, image.reference, name,
                             f"http://127.0.0.1:{port}/v2/{repository}/manifests/{tag}")
        digest, digests, sizes = parse_manifest(pushed.sections.get("manifest", ""), image)
        yield Served(node, image, port, repository, digest, digests, sizes)
        failed = False
    finally:
        _stop(node, target, run, name, quiet=failed)


def _stop(node: Node, target: Target, run: str, name: str, quiet: bool) -> None:
    """STOP; on the way out of a failure (``quiet``) its own failure must not hide the first one."""
    try:
        scripts.run(target, STOP, run, name or "-")
    except Exception:
        if not quiet:
            raise


def _pulled(output: str, served: Served) -> set[int] | None:
    """Which layers ``docker pull`` downloaded, by its lines (``<12 hex>: Pull complete`` or
    ``Already exists``); None when it printed neither for some layer (then the plan stands)."""
    said: dict[str, str] = {}
    for line in output.splitlines():
        short, _, state = line.partition(": ")
        if state.strip() in ("Pull complete", "Already exists"):
            said[short.strip()] = state.strip()
    states = [said.get(digest.split(":")[-1][:12]) for digest in served.layer_digests]
    if None in states:
        return None
    return {index for index, state in enumerate(states) if state == "Pull complete"}


def pull(node: Node, target: Target, served: Served, planned: ImagePlan,
         progress: Callable[[int], None] | None = None) -> ImageSent:
    """The served image into ``node``'s engine through a tunnel to the holder; nothing when the node
    has it by ID and labels. After pulling, the node's image must have the holder's ID and labels."""
    started = time.monotonic()
    image = served.image
    if planned.up_to_date:
        return ImageSent(image.reference, image.id, "up to date", 0, 0, 0, time.monotonic() - started)
    for _ in range(PORT_ATTEMPTS):
        port = random.randint(*LOCAL_PORTS)
        ran = scripts.run(target, PULL, served.pull_name(port), image.reference, port,
                          *hop.tunnel_argv(served.holder, port, served.port), check=False)
        if ran.exit_code != PORT_IN_USE:
            break
    if ran.exit_code == NO_TUNNEL:
        said = ran.stderr.strip().splitlines()[-1:] or ["no answer"]
        holder = served.holder
        unnamed = holder.connection == "local" and not holder.address and not holder.fabric.address
        raise CheckFailed(f"{node.name}: cannot open an SSH tunnel to {holder.name} "
                          f"({hop.address(holder)}) to pull {image.reference}: {said[0].rstrip('.')}; "
                          + (f"{holder.name} is this machine (connection = \"local\") and hosts.toml gives "
                             "no address the other nodes reach it at: add its address there, then run "
                             "`invoke ssh.setup`" if unnamed else
                             "nodes reach each other with the keys `invoke ssh.setup` gives them: run it "
                             "and try again"))
    if not ran.ok:
        raise StepFailed(node.name, PULL.step, ran.result)
    fetched = _pulled(ran.sections.get("pull", ""), served)
    if fetched is None:
        fetched = {index for index, held in enumerate(planned.have) if not held}
    sent = sum(served.layer_sizes[index] for index in fetched)
    if progress is not None:
        progress(sent)
    after = layers.look(node, target, image)
    if not after.up_to_date:
        raise CheckFailed(f"{node.name}: after pulling, {image.reference} does not have "
                          f"{served.holder.name}'s ID {image.id[:19]} and labels")
    return ImageSent(image.reference, image.id, "pulled", sent, sum(served.layer_sizes) - sent,
                     len(fetched), time.monotonic() - started)


def distribute(holder: Node, holder_target: Target, reference: str, receivers: Sequence[Node], *,
               reach: Callable[[Node], Target] = connect) -> GroupResult[ImageSent]:
    """``reference`` from ``holder`` to every receiver that lacks it, all at once; a registry is
    started only when some receiver needs layers. The holder itself receives nothing."""
    image = inspect(holder, holder_target, reference)
    others = [node for node in receivers if node.name != holder.name]
    plans = fan_out(others, lambda node, target: layers.look(node, target, image), reach=reach)
    plans.raise_for_failures()
    if all(plans[node.name].value.up_to_date for node in others):
        return GroupResult([Outcome(node, value=ImageSent(image.reference, image.id, "up to date", 0, 0,
                                                          0, 0.0)) for node in others])
    with serve(holder, holder_target, image) as served:
        return fan_out(others, lambda node, target: pull(node, target, served, plans[node.name].value),
                       reach=reach)
