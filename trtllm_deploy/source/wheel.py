"""The ``wheel`` kind: a pinned tensorrt-llm wheel installed onto the pinned PyTorch base.

Its requirements are resolved where they will be installed: ``pip install --dry-run --report`` runs
inside the base image on the build node, so the pins fit that platform, that Python and what the
base already has, and every file comes with the hash the index (or the local wheel folder) gives.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable

from trtllm_deploy.errors import DeployError, InputError
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target, expand
from trtllm_deploy.source.lock import LockFile
from trtllm_deploy.source.plan import (ROOT, BuildPlan, image_ref, label_words, labels, labels_on, look,
                                       up_to_date)

REQUIREMENTS_NAME = "tensorrt-llm-wheel.txt"
WHEELS_MOUNT = "/tmp/trtllm-deploy-wheels"
WHEEL_CONTEXT = ROOT / "docker" / "wheel"


def pip_args(version: str, local_wheels: bool) -> list[str]:
    return [*(["--no-index", "--find-links", WHEELS_MOUNT] if local_wheels else []),
            f"tensorrt-llm=={version}"]


def resolve(target: Target, base_image: str, version: str, find_links: str | None) -> str:
    """The hash-pinned requirements that install tensorrt-llm ``version`` onto ``base_image``."""
    mounts = []
    folder = expand(find_links, target.home()) if find_links else None
    if folder:
        mounts = ["--volume", f"{folder}:{WHEELS_MOUNT}:ro"]
    done = target.run(["docker", "run", "--rm", "--network", "host", *mounts,
                       "--env", "PIP_DISABLE_PIP_VERSION_CHECK=1", "--entrypoint", "pip", base_image,
                       "install", "--dry-run", "--quiet", "--report", "-",
                       *pip_args(version, bool(find_links))], check=False, timeout=1800)
    if not done.ok:
        raise DeployError(f"resolving tensorrt-llm=={version} in {base_image} failed: "
                          f"{(done.stderr or done.stdout).strip()[-1500:]}")
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise DeployError(f"pip in {base_image} gave no installation report (pip >= 22.2 needed): "
                          f"{done.stdout.strip()[-300:]}") from None

    def local_hash(url: str) -> str | None:
        """An older pip reports no hash for a file of the wheel folder: hash it on the node."""
        prefix = f"file://{WHEELS_MOUNT}/"
        if not folder or not url.startswith(prefix):
            return None
        done = target.run(["sha256sum", "--", f"{folder}/{url[len(prefix):]}"], check=False, timeout=600)
        return done.stdout.split()[0] if done.ok else None

    return requirements(report, f"tensorrt-llm=={version} on {base_image}", local_hash)


def requirements(report: dict, what: str, local_hash=lambda url: None) -> str:
    """A requirements file with one ``name==version --hash=sha256:...`` per package to install."""
    environment = report.get("environment", {})
    lines = [f"# Written by `invoke source.update` for {what}",
             f"# (resolved there by pip: {environment.get('platform_machine', '?')}, Python "
             f"{environment.get('python_full_version', '?')}). Do not edit; update the lock instead.",
             ""]
    for item in sorted(report.get("install", []), key=lambda i: i["metadata"]["name"].lower()):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        info = item.get("download_info", {})
        digest = (info.get("archive_info", {}).get("hashes", {}).get("sha256")
                  or local_hash(info.get("url", "")))
        if item.get("is_direct") or not digest:
            raise DeployError(f"{name} {version} comes from {info.get('url', 'an unknown place')} "
                              "without a sha256 the lock could pin; use an index or wheel folder")
        lines += [f"{name}=={version} \\", f"    --hash=sha256:{digest}"]
    return "\n".join(lines) + "\n"


def plan(cluster: Cluster, lockfile: LockFile, reach: Callable[[Node], Target] = connect) -> BuildPlan:
    """The lock's hash-pinned requirements installed onto its base image."""
    lock = lockfile.lock
    requirements = lockfile.requirements_path
    if not requirements or not requirements.exists():
        raise InputError(f"{lockfile.path}: the wheel kind needs its requirements file "
                         f"({requirements or 'wheel.requirements'}); run `invoke source.update`")
    look(cluster, reach)
    builder = cluster.build_node
    image = image_ref(lockfile)
    target = reach(builder)
    try:
        current = labels_on(target, image)
        context = posixpath.join(expand(builder.paths.state, target.home()), "wheel-build")
        wheels = expand(lock.wheel.find_links, target.home()) if lock.wheel.find_links else None
    finally:
        target.close()
    found = labels(lockfile, "", None, lock.wheel.version, lock.build.base_image)
    commands = [["mkdir", "-p", f"{context}/wheels"]]
    if wheels:
        commands.append(["cp", "-a", f"{wheels}/.", f"{context}/wheels/"])
    commands.append(["docker", "build", "--force-rm", "--build-arg", f"BASE_IMAGE={lock.build.base_image}",
                     *(["--build-arg", "LOCAL_WHEELS=1"] if wheels else []),
                     *label_words(found), "--tag", image, context])
    notes = [f"tensorrt-llm {lock.wheel.version} from "
             + (f"the wheel folder {lock.wheel.find_links} on {builder.name}" if wheels
                else "the package index") + f", hash-pinned by {requirements.name}",
             "CUDA architectures: the ones upstream built the wheel for"]
    return BuildPlan(builder.name, image, lockfile.hash, "", 0, "no compile: a published wheel",
                     commands, found, up_to_date(current, lockfile), notes,
                     upload=[(WHEEL_CONTEXT, context),
                             (requirements, posixpath.join(context, "requirements.txt"))])
