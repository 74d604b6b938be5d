"""``diagnose.profile``: an Nsight Systems (``nsys profile``) trace of a short serving run on the
head node, the report fetched back here.

The run is the current deployment's serving program (trtllm_deploy.serving.launch.program) started once
more, alone, inside the head's runtime container, for ``--seconds``; or any program given.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from trtllm_deploy.dryrun import HERE, Plan
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.scripts import Script

NSYS_MISSING = ("nsys (NVIDIA Nsight Systems) is not installed {where}: install the "
                "'nsight-systems-cli' package from NVIDIA's CUDA repository (or use a runtime image "
                "that has it, e.g. NVIDIA's PyTorch/TensorRT-LLM release images), then run "
                "diagnose.profile again")
REMOTE_DIR = "/tmp/trtllm-deploy-profile"
HAS_NSYS = Script("look for nsys", "command -v nsys")


def nsys_argv(program: list[str], seconds: int, output: str) -> list[str]:
    """``nsys profile`` of ``program`` for ``seconds``, CUDA/NVTX/OS runtime and MPI traced."""
    return ["nsys", "profile", "--trace=cuda,nvtx,osrt,mpi", "--sample=none",
            "--duration", str(int(seconds)), "--force-overwrite=true", "--output", output, *program]


def _what(cluster, program: list[str] | None):
    """The deployment recorded as current (or None) and the program to profile: ``program``, else
    that deployment's own serving program."""
    from trtllm_deploy.serving import launch, state

    deployment = state.current(cluster)
    if program is None:
        if deployment is None:
            raise CheckFailed("nothing to profile: no deployment is recorded for this cluster; "
                              "run invoke launch first, or pass --program")
        program = launch.program(deployment)
    return deployment, program


def plan(cluster, seconds: int, out: Path, program: list[str] | None = None,
         in_container: bool = True) -> Plan:
    """What :func:`run` would do (``--dry-run``): the same choice of program and place, nothing run."""
    import shlex

    deployment, program = _what(cluster, program)
    head = cluster.head
    where = f" in {deployment.job}'s runtime container" if in_container and deployment else ""
    steps = Plan("diagnose.profile")
    steps.add(head.name, f"{shlex.join(nsys_argv(program, seconds, posixpath.join(REMOTE_DIR, 'serve')))}"
                         f"{where} (needs nsys there)")
    steps.add(HERE, f"fetch the report into {out / f'{head.name}-serve.nsys-rep'}")
    return steps


def run(cluster, seconds: int, out: Path, program: list[str] | None = None,
        in_container: bool = True) -> Path:
    """Profile on the head; return the fetched ``.nsys-rep``."""
    from trtllm_deploy.hosts.connections import connect
    from trtllm_deploy.hosts.targets import CommandFailed
    from trtllm_deploy.serving import containers

    deployment, program = _what(cluster, program)
    head = cluster.head
    inside = bool(in_container and deployment)
    target = containers.enter(cluster, deployment.job) if inside else connect(head)
    where = f"on {head.name}" + (" in the runtime container" if inside else "")
    try:
        if not scripts.run(target, HAS_NSYS, check=False).ok:
            raise CheckFailed(NSYS_MISSING.format(where=where))
        output = posixpath.join(REMOTE_DIR, "serve")
        target.run(["mkdir", "-p", REMOTE_DIR])
        done = target.run(nsys_argv(program, seconds, output), timeout=seconds + 300, check=False)
        if not target.run(["test", "-s", output + ".nsys-rep"], check=False).ok:
            raise CommandFailed(done)
        out.mkdir(parents=True, exist_ok=True)
        local = out / f"{head.name}-serve.nsys-rep"
        target.get(output + ".nsys-rep", local)
        return local
    finally:
        target.close()
