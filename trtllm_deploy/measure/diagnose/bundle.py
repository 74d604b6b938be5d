"""``diagnose.bundle``: one ``.tar.gz`` to attach to a bug report — every node's versions, kernel,
driver, Docker and images, the fabric (diagnose.link), the job's recent logs, the inventory — with
secrets scrubbed from every byte before it is written.

Scrubbed: every value registered with trtllm_deploy.secrets, and by pattern: Hugging Face and
GitHub tokens, ``*_TOKEN`` / ``*_SECRET`` / ``*PASSWORD*`` / ``*_KEY`` assignments, bearer tokens,
and private-key blocks.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
import time
from pathlib import Path

from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.secrets import MASK, redact

_PATTERNS = (
    # key material: the whole block
    re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?-----END [A-Z0-9 ]*PRIVATE KEY-----", re.S),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),                          # Hugging Face
    re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})\b"),  # GitHub
    re.compile(r"(?i)(authorization:\s*bearer\s+)\S+"),
    # NAME=value / NAME: value / "NAME": "value" where the name says secret
    re.compile(r"""(?i)(["']?\b[A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY)"""
               r"""[A-Z0-9_]*\b["']?\s*[=:]\s*["']?)([^\s"',]+)"""),
)


def scrub(text: str) -> str:
    """``text`` with registered secrets and anything shaped like a secret replaced by ``***``."""
    text = redact(text)
    for pattern in _PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + MASK, text)
        else:
            text = pattern.sub(MASK, text)
    return text


# What a bug report needs of a node, as one text with a "### what" heading per part.
NODE_REPORT = Script("collect the node's versions and state", r"""
section() { echo; echo "### $*"; }
run() { section "$*"; "$@" 2>&1 || echo "(exit $?)"; }
run uname -a
section /etc/os-release; cat /etc/os-release 2>&1
run uptime
section nvidia-smi
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi 2>&1; nvidia-smi dmon -s pucm -c 1 2>&1; \
else echo "nvidia-smi is not installed"; fi
section driver; cat /proc/driver/nvidia/version 2>&1 || echo "no NVIDIA kernel driver loaded"
run docker version
run docker images --digests
run docker ps -a
run mpirun --version
run python3 --version
run df -h
section /proc/meminfo; head -5 /proc/meminfo
""", timeout=120)
# $1 the folder of the node's jobs: every job that left logs there.
LIST_JOBS = Script("list the jobs with logs",
                   'cd "$1" 2>/dev/null && for d in */logs; do echo "${d%/logs}"; done; exit 0')


def _add(archive: tarfile.TarFile, name: str, text: str) -> None:
    data = scrub(text).encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o600
    archive.addfile(info, io.BytesIO(data))


def _jobs_on(node, target) -> list[str]:
    """Every job that left logs on the node (the current one, earlier ones, rollbacks, checks)."""
    from trtllm_deploy.serving.containers import job_dir

    folder = posixpath.dirname(job_dir(node, target.home(), "x"))
    listed = scripts.run(target, LIST_JOBS, folder, check=False).stdout
    return [line for line in listed.split() if line and line != "*"]


def collect(cluster, hosts_path: Path | None, log_lines: int = 200) -> dict[str, str]:
    """Everything cheap, as ``{path in the archive: text}`` (not yet scrubbed)."""
    from trtllm_deploy.hosts.fanout import fan_out
    from trtllm_deploy.measure.diagnose import link
    from trtllm_deploy.serving import state
    from trtllm_deploy.serving.jobs import tails

    files: dict[str, str] = {}
    for outcome in fan_out(cluster.nodes, lambda node, target: scripts.run(target, NODE_REPORT, check=False)):
        files[f"nodes/{outcome.node.name}.txt"] = (
            outcome.value.stdout + outcome.value.stderr if outcome.ok else f"unreachable: {outcome.reason}")
    try:
        files["link.json"] = json.dumps(link.run(cluster).as_json(), indent=1, default=str)
    except Exception as exc:  # noqa: BLE001 - the bundle still holds everything else
        files["link.json"] = json.dumps({"error": str(exc)})
    deployment = state.current(cluster)
    files["deployment.json"] = json.dumps(deployment.as_json() if deployment else None, indent=1)
    with_logs: set[str] = set()
    for outcome in fan_out(cluster.nodes, _jobs_on):
        with_logs.update(outcome.value if outcome.ok else ())
    for job in sorted(with_logs):
        for name, text in tails(cluster, job, lines=log_lines).items():
            files[f"logs/{job}/{name}"] = text
    if hosts_path and hosts_path.is_file():
        files["hosts.toml"] = hosts_path.read_text()
    return files


def write(files: dict[str, str], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as archive:
        _add(archive, "README.txt", "trtllm-deploy diagnostic bundle, made "
             f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; secrets scrubbed (shown as {MASK}).\n"
             + "".join(f"  {name}\n" for name in sorted(files)))
        for name, text in sorted(files.items()):
            _add(archive, name, text)
    out.chmod(0o600)
    return out
