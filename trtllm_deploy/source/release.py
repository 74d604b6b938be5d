"""The ``release`` kind: NVIDIA's release image, pinned by digest, under a thin overlay that adds
this lock's labels (``docker/release-overlay``)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable

from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target, expand
from trtllm_deploy.source.lock import LockFile
from trtllm_deploy.source.plan import (ROOT, BuildPlan, coverage, image_ref, label_words, labels, labels_on,
                                       look, up_to_date)

# Upstream's Makefile default for arm64 without CUDA_ARCHS (docs/SOURCES.md#building-from-source): what a
# release image is assumed to carry, since it does not say.
RELEASE_ARCHS = {"aarch64": "90-real;100-real;120-real"}
OVERLAY = ROOT / "docker" / "release-overlay"


def plan(cluster: Cluster, lockfile: LockFile, reach: Callable[[Node], Target] = connect) -> BuildPlan:
    """The release image pulled where the build node lacks it, then the overlay built on it."""
    lock = lockfile.lock
    release = lock.release.image or ""
    facts = look(cluster, reach)
    builder = cluster.build_node
    notes = []
    archs = RELEASE_ARCHS.get(facts[builder.name].arch, "")
    if archs:
        notes += coverage(facts, archs, "a release image's architectures cannot be chosen: use "
                                        "the source kind")
        notes.append(f"CUDA_ARCHS of the release assumed to be upstream's arm64 default {archs!r}")
    image = image_ref(lockfile)
    target = reach(builder)
    try:
        # Looked up by name and tag: an image pulled by digest answers to that too, and one
        # with another digest must be found to be refused.
        env = target.run(["docker", "image", "inspect", "--format",
                          "{{json .Config.Env}}|{{json .RepoDigests}}", release.split("@")[0]],
                         check=False, timeout=60)
        current = labels_on(target, image)
        context = posixpath.join(expand(builder.paths.state, target.home()), "release-overlay")
    finally:
        target.close()
    commands = []
    revision = version = None
    if env.ok:
        variables, digests = (json.loads(part or "null") or [] for part in env.stdout.split("|", 1))
        values = dict(item.split("=", 1) for item in variables if "=" in item)
        revision, version = values.get("TRT_LLM_GIT_COMMIT"), values.get("TRT_LLM_VERSION")
        if "@sha256:" in release and not any(d.endswith(release.split("@", 1)[1]) for d in digests):
            raise CheckFailed(f"{builder.name} has {release.split('@')[0]} but not with the locked "
                              f"digest (it has {digests or 'no registry digest'}); remove it there "
                              "(docker rmi) so the pinned one is pulled")
        notes.append(f"release image present on {builder.name}"
                     + (f": TensorRT-LLM {version} at {revision[:12]}" if revision and version else ""))
    else:
        commands.append(["docker", "pull", release])
        notes.append(f"{release} will be pulled on {builder.name}")
    if "@sha256:" not in release:
        notes.append("the release image is not pinned by digest: run `invoke source.update` once it "
                     "is on the build node to record its digest")
    found = labels(lockfile, "", revision, version, release)
    commands.append(["docker", "build", "--force-rm", "--build-arg", f"RELEASE_IMAGE={release}",
                     *label_words(found), "--tag", image, context])
    return BuildPlan(builder.name, image, lockfile.hash, archs, 0, "no compile: a release image",
                     commands, found, up_to_date(current, lockfile), notes, upload=[(OVERLAY, context)])
