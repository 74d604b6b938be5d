"""The ``source`` kind: the image compiled from the locked commit by upstream's
``make -C docker release_build``, with the parallel compile jobs sized to the build node's memory.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable

from trtllm_deploy.hosts.inventory import Cluster, Node
from trtllm_deploy.hosts.shell import join
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.targets import Target
from trtllm_deploy.source.lock import LockFile
from trtllm_deploy.source.plan import (LABEL_ARCHS, BuildPlan, coverage, image_ref, label_words, labels,
                                       labels_on, look, up_to_date)

GB = 1024 ** 3
PER_JOB_GB = 8      # a CUDA compile job of TensorRT-LLM's kernels peaks at several GB
RESERVE_GB = 8      # left to the OS (and, on a Spark, the GPU: the memory is shared)


def jobs_for(mem_available_bytes: int, cpus: int) -> tuple[int, str]:
    """Parallel compile jobs that fit in memory (the commonest build failure is the OOM killer)."""
    usable = max(0.0, mem_available_bytes / GB - RESERVE_GB)
    by_memory = max(1, int(usable // PER_JOB_GB))
    jobs = max(1, min(cpus, by_memory))
    why = (f"{jobs} jobs: {mem_available_bytes / GB:.0f} GB available − {RESERVE_GB} GB reserve, "
           f"{PER_JOB_GB} GB per compile job → {by_memory}; {cpus} cores")
    return jobs, why


def plan(cluster: Cluster, lockfile: LockFile, tree: str = "", cuda_archs: str | None = None,
         jobs: int | None = None, ccache: bool = False,
         reach: Callable[[Node], Target] = connect) -> BuildPlan:
    """Every check that can refuse the source build, before anything is built."""
    lock = lockfile.lock
    facts = look(cluster, reach)
    builder = cluster.build_node
    mine = facts[builder.name]
    archs = cuda_archs or lock.build.cuda_archs
    notes = coverage(facts, archs, f"--cuda-archs, or [build] cuda_archs in {lockfile.path}")
    if jobs or lock.build.jobs:
        count = jobs or lock.build.jobs
        why = f"{count} jobs, as asked ({'--jobs' if jobs else 'build.jobs in the lock'})"
    else:
        count, why = jobs_for(mine.mem_available, mine.cpus)
    wheel_opts = lock.build.options.get("BUILD_WHEEL_OPTS", "")
    use_ccache = ccache and "ccache" not in wheel_opts
    if "ccache" in wheel_opts:
        notes.append("ccache: as the lock's BUILD_WHEEL_OPTS says")
    else:
        notes.append("ccache: used (the pinned tree's image build sets it up)" if use_ccache else
                     "ccache: not available at this pin (its Dockerfile.multi does not set it up)")
    image = image_ref(lockfile)
    found = labels(lockfile, archs)
    target = reach(builder)
    try:
        current = labels_on(target, image)
    finally:
        target.close()
    return BuildPlan(builder.name, image, lockfile.hash, archs, count, why,
                     [make_argv(lockfile, tree, image, archs, count, found, use_ccache)], found,
                     up_to_date(current, lockfile) and current.get(LABEL_ARCHS) == archs, notes)


def make_argv(lockfile: LockFile, tree: str, image: str, archs: str, jobs: int,
              image_labels: dict[str, str], ccache: bool = False) -> list[str]:
    """``make -C <tree>/docker release_build VAR=value ...`` with the lock's options."""
    options = dict(lockfile.lock.build.options)
    wheel_opts = " ".join(filter(None, [options.pop("BUILD_WHEEL_OPTS", ""), f"--job_count {jobs}",
                                        "--use_ccache" if ccache else ""]))
    name, tag = image.rsplit(":", 1)
    # The Makefile's own default (--pull --load: buildx must load the image into the engine),
    # then the labels, quoted for the recipe's shell.
    docker_opts = join(["--pull", "--load", *label_words(image_labels)])
    return ["make", "-C", posixpath.join(tree, "docker"), lockfile.lock.build.make_target,
            f"CUDA_ARCHS={archs}", f"IMAGE_NAME={name}", f"IMAGE_TAG={tag}",
            f"IMAGE_WITH_TAG={image}",
            f"BUILD_WHEEL_OPTS={wheel_opts}", f"DOCKER_BUILD_OPTS={docker_opts}",
            *(f"{key}={value}" for key, value in sorted(options.items()))]
