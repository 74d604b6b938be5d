"""The ``wheel`` source kind: a pinned tensorrt-llm wheel installed onto the pinned PyTorch base.

Its requirements are resolved where they will be installed: ``pip install --dry-run --report`` runs
inside the base image on the build node, so the pins fit that platform, that Python and what the
base already has, and every file comes with the hash the index (or the local wheel folder) gives.
"""

from __future__ import annotations

import json

from trtllm_deploy.errors import DeployError
from trtllm_deploy.hosts.targets import Target, expand

REQUIREMENTS_NAME = "tensorrt-llm-wheel.txt"
WHEELS_MOUNT = "/tmp/trtllm-deploy-wheels"


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
