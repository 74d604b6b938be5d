"""``invoke supervise --install`` / ``--uninstall``: the supervisor kept running on the head.

How it is kept running is chosen from what the head has, and shown in the plan: a systemd system
service where ``sudo -n`` works and systemd runs (/run/systemd/system); else a systemd user service
(``systemctl --user``, with ``loginctl enable-linger`` so that it runs without a login and after a
reboot); else (no systemd, as in the testbed) a container that Docker restarts
(``--restart unless-stopped``). The systemd units run the same container in the foreground.

Install is look, then act: the head's record of what is installed (``install.json`` in the
supervisor's folder) equal to what would be installed, and the supervisor running, is up to date;
anything changed is replaced. The image is built on the head (its own architecture) from
docker/supervisor/, or here and sent to the head (``build="here"``: the testbed, whose nodes reach
no registry).
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from trtllm_deploy import push
from trtllm_deploy.dryrun import Plan
from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts import knownhosts, scripts
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.inventory import Cluster
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.hosts.targets import Target
from trtllm_deploy.serving import state
from trtllm_deploy.serving.servicefiles import (CONFIG_DIR, DOCKERFILE, STATE_DIR, Head, Options, config_dir,
                                               context_files, docker_run, head_view, image_tag, name_of,
                                               pinned_names, same, state_dir, unit, unit_path, wanted)
from trtllm_deploy.serving.supervise import POLICIES

DEFAULT_BASE = "ubuntu:24.04"
BUILDS = ("head", "here")
SYSTEMD = "/run/systemd/system"
SITE_CA = Path("/usr/local/share/ca-certificates")

# What the head is: who, where its home is, how a service can be kept running there, its key and
# pinned host keys. "$1": the folder whose presence means systemd runs; "$2": programs found first.
DETECT = Script("find how the head can keep a service running", """
test -n "$2" && PATH=$2:$PATH
mark who; id -un; id -u; id -g; printf '%s\\n' "$HOME"
mark mode
if [ -d "$1" ] && command -v systemctl >/dev/null 2>&1; then
  if sudo -n true >/dev/null 2>&1; then echo "system sudo -n works and systemd runs"
  elif systemctl --user show-environment >/dev/null 2>&1; then
    echo "user systemd runs and this user's manager answers (no sudo -n)"
  else echo "container systemd runs, but neither sudo -n nor this user's manager (systemctl --user) answers"
  fi
else echo "container no systemd on the head ($1 is missing)"; fi
mark linger; loginctl show-user "$(id -un)" --property=Linger --value 2>/dev/null
mark key; test -f "$HOME/.ssh/id_ed25519" && echo yes
mark known_hosts; cat "$HOME/.ssh/known_hosts" 2>/dev/null
exit 0
""")
# What is installed on the head: its record, whether it runs (each way), the cluster's record and
# the last "$4" lines of the history. "$1" config folder, "$2" state folder, "$3" name.
LOOK = Script("look at the head's supervisor", """
mark install; cat "$1/install.json" 2>/dev/null
mark container; docker inspect --format '{{.State.Status}}' "$3" 2>/dev/null
mark system; command -v systemctl >/dev/null && systemctl is-active "$3.service" 2>/dev/null
mark user; command -v systemctl >/dev/null && systemctl --user is-active "$3.service" 2>/dev/null
mark units; ls "/etc/systemd/system/$3.service" "$HOME/.config/systemd/user/$3.service" 2>/dev/null
mark deployments; cat "$2/deployments.json" 2>/dev/null
mark history; tail -n "$4" "$2/supervisor.jsonl" 2>/dev/null
exit 0
""")


def detect(target: Target, booted: str = SYSTEMD, path: str = "") -> tuple[Head, str]:
    """The head's user and how it can keep the supervisor running; and its known_hosts text."""
    ran = scripts.run(target, DETECT, booted, path)
    who = ran.sections.get("who", "").split()
    mode, _, why = ran.sections.get("mode", "container").strip().partition(" ")
    if ran.sections.get("key", "").strip() != "yes":
        raise InputError("the head has no ~/.ssh/id_ed25519: the supervisor reaches the nodes with the "
                         "head's own key; run `invoke ssh.setup` first")
    linger = ran.sections.get("linger", "").strip()
    return Head(who[0], int(who[1]), int(who[2]), who[3], mode, why,
                None if not linger else linger == "yes"), ran.sections.get("known_hosts", "")


def check_pins(cluster: Cluster, known_hosts: str) -> None:
    """Every node must be pinned in the head's known_hosts under the name the supervisor uses."""
    lacking = [f"{node} ({name})" for node, name in pinned_names(cluster).items()
               if not (found := knownhosts.pins(known_hosts, name)).keys and not found.authorities]
    if lacking:
        raise InputError(f"the head's ~/.ssh/known_hosts pins no host key for {', '.join(lacking)}: "
                         "the supervisor checks host keys strictly; run `invoke ssh.setup` first")


@dataclass
class Installed:
    """What the head shows of its supervisor (and of the cluster's record there)."""

    record: dict | None
    running: dict[str, str]          # container/system/user -> state as each reports it
    units: list[str]
    deployments: dict
    history: list[dict]

    @property
    def installed(self) -> bool:
        return self.record is not None

    @property
    def active(self) -> bool:
        mode = (self.record or {}).get("mode")
        return self.running.get(mode) in ("running", "active")

    def as_json(self) -> dict:
        return {"installed": self.installed, "mode": (self.record or {}).get("mode"),
                "image": (self.record or {}).get("image"), "running": self.active,
                "state": self.running.get((self.record or {}).get("mode", ""), ""),
                "options": (self.record or {}).get("options"), "current": self.deployments.get("current"),
                "history": self.history}


def look(cluster: Cluster, target: Target | None = None, lines: int = 20) -> Installed:
    own = target is None
    target = target or connect(cluster.head)
    try:
        home = target.home()
        ran = scripts.run(target, LOOK, f"{home}/{CONFIG_DIR}/{cluster.name}",
                          f"{home}/{STATE_DIR}/{cluster.name}", name_of(cluster), lines)
    finally:
        if own:
            target.close()
    parts = ran.sections
    history = []
    for line in parts.get("history", "").splitlines():
        try:
            history.append(json.loads(line))
        except ValueError:
            continue
    return Installed(_json(parts.get("install", "")),
                     {mode: parts.get(mode, "").strip() for mode in ("container", "system", "user")},
                     parts.get("units", "").split(), _json(parts.get("deployments", "")) or {}, history)


def _json(text: str) -> dict | None:
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


@dataclass
class Intent:
    """What install would do: the plan, and what it needs to act."""

    plan: Plan
    head: Head
    desired: dict
    image: str
    image_there: bool
    up_to_date: bool
    copy_state: bool
    lock_text: str | None


def intend(cluster: Cluster, options: Options, *, build: str = "head", base: str = DEFAULT_BASE,
           lock: Path | None = None, mode: str = "", target: Target | None = None) -> Intent:
    """Look at the head and plan; nothing changes."""
    if options.on_failure not in POLICIES:
        raise InputError(f"--on-failure {options.on_failure!r}: expected one of {', '.join(POLICIES)}")
    if build not in BUILDS:
        raise InputError(f"--build {build!r}: expected one of {', '.join(BUILDS)}")
    head_node = cluster.head
    own = target is None
    target = target or connect(head_node)
    try:
        head, known = detect(target)
        if mode:
            head = replace(head, mode=mode, why=f"asked for ({mode})")
        check_pins(cluster, known)
        if not target.run(["docker", "version", "--format", "{{.Server.Version}}"], check=False,
                          timeout=60).stdout.strip():
            raise CheckFailed("the head's Docker engine does not answer for its user (docker version): "
                              "the supervisor runs in a container there")
        image = image_tag(base)
        there = bool(target.run(["docker", "image", "inspect", "--format", "{{.Id}}", image],
                                check=False, timeout=60).stdout.strip())
        installed = look(cluster, target)
    finally:
        if own:
            target.close()
    lock_text = lock.read_text() if lock is not None and lock.is_file() else None
    desired = wanted(cluster, head, image, options, lock_text)
    fresh = same(installed.record, desired) and installed.active and there
    ours, theirs = state.current(cluster), (installed.deployments.get("current") or None)
    copy = not installed.deployments or (ours is not None and (ours.started or "") > (theirs or {}).get(
        "started", ""))
    plan = Plan("supervise --install")
    name = head_node.name
    plan.add(name, f"keep the supervisor running as a {_how(head.mode)} ({head.why})")
    if head.mode == "user" and not head.linger:
        plan.notes.append("systemd would stop the user's services at logout and start them only at its "
                          "next login: install runs `loginctl enable-linger`, and says so if it cannot")
    if fresh:
        plan.add(name, f"up to date: {name_of(cluster)} runs {image} with these options; nothing to do")
        return Intent(plan, head, desired, image, there, True, False, lock_text)
    plan.add(name, f"image {image}: " + ("already on the head" if there else
             f"build on the head from {base}" if build == "head" else
             f"build on this machine from {base}, then send it to the head"))
    plan.add(name, f"write {config_dir(head, cluster)}/hosts.toml (the nodes at the addresses their peers "
                   "use, the head's key and known_hosts)" + (" and the lock" if lock_text else ""))
    if copy:
        plan.add(name, f"copy this machine's record of {cluster.name} (current: "
                       f"{ours.job if ours else 'none'}) to {state_dir(head, cluster)}")
    else:
        plan.add(name, "keep the head's record of the deployments (it is as new as this machine's)")
    verb = "replace the installed supervisor" if installed.installed else "start the supervisor"
    if head.mode == "container":
        plan.add(name, f"{verb}: docker run -d --restart unless-stopped --name {name_of(cluster)} ...")
    else:
        plan.add(name, f"{verb}: write {unit_path(cluster, head)} and enable it "
                       f"(systemctl{'' if head.mode == 'system' else ' --user'} enable --now)")
    return Intent(plan, head, desired, image, there, False, copy, lock_text)


def _how(mode: str) -> str:
    return {"system": "systemd system service", "user": "systemd user service",
            "container": "container Docker restarts (--restart unless-stopped)"}[mode]


def build_image(target: Target, image: str, base: str) -> None:
    """``docker build`` of docker/supervisor/ on ``target`` (the head, or this machine)."""
    with tempfile.TemporaryDirectory(prefix="trtllm-deploy-supervisor-") as scratch:
        tar = Path(scratch) / "context.tar"
        with tarfile.open(tar, "w") as out:
            for name, path in context_files():
                out.add(path, arcname=name)
            site = tarfile.TarInfo("site-ca")
            site.type, site.mode = tarfile.DIRTYPE, 0o755
            out.addfile(site)
            for path in sorted(SITE_CA.glob("*.crt")) if SITE_CA.is_dir() else []:
                out.add(path, arcname=f"site-ca/{path.name}")
        folder = target.run(["mktemp", "-d"], timeout=60).stdout.strip()
        try:
            target.put(tar, f"{folder}/context.tar")
            target.run(["tar", "-xf", f"{folder}/context.tar", "-C", folder], timeout=300)
            target.run(["docker", "build", "--quiet", "--file", f"{folder}/{DOCKERFILE}/Dockerfile",
                        "--build-arg", f"BASE={base}", "--tag", image, folder], timeout=1800)
        finally:
            target.run(["rm", "-rf", folder], check=False, timeout=120)


def install(cluster: Cluster, intent: Intent, *, build: str = "head", base: str = DEFAULT_BASE,
            report=lambda line: None) -> Installed:
    """Act on ``intent``; then check that the supervisor runs (CheckFailed if it does not)."""
    if intent.up_to_date:
        return look(cluster)
    head = intent.head
    if not intent.image_there:
        report(f"building {intent.image} ({'on the head' if build == 'head' else 'here'})")
        if build == "here":
            build_image(Local("this machine"), intent.image, base)
            push.push([cluster.head], push.source(image=intent.image)).raise_for_failures()
        else:
            target = connect(cluster.head)
            try:
                build_image(target, intent.image, base)
            finally:
                target.close()
    target = connect(cluster.head)
    try:
        config, states = config_dir(head, cluster), state_dir(head, cluster)
        target.run(["mkdir", "-p", "-m", "700", config, states], timeout=60)
        files = {"hosts.toml": head_view(cluster, head)}
        if intent.lock_text is not None:
            files["tensorrt-llm.lock.toml"] = intent.lock_text
        if intent.copy_state:
            files[f"{states}/deployments.json"] = json.dumps(state.state(cluster), indent=2, sort_keys=True)
        _put_texts(target, config, files)
        _start(cluster, target, head, intent)
        _put_texts(target, config, {"install.json": json.dumps(intent.desired, indent=2, sort_keys=True)})
        found = look(cluster, target)
    finally:
        target.close()
    if not found.active:
        raise CheckFailed(f"the supervisor was installed as a {_how(head.mode)} but does not run "
                          f"({found.running.get(head.mode) or 'not found'}); see `invoke status`")
    return found


def _put_texts(target: Target, folder: str, files: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        for name, text in files.items():
            local = Path(scratch) / Path(name).name
            local.write_text(text)
            target.put(local, name if name.startswith("/") else f"{folder}/{name}")


def _start(cluster: Cluster, target: Target, head: Head, intent: Intent) -> None:
    name, lock = name_of(cluster), intent.lock_text is not None
    _remove_running(target, name)
    if head.mode == "container":
        target.run(docker_run(cluster, head, intent.image, Options(**intent.desired["options"]), detach=True,
                              lock=lock), timeout=120)
        return
    text = unit(cluster, head, intent.image, Options(**intent.desired["options"]), lock=lock)
    path = unit_path(cluster, head)
    if head.mode == "system":
        target.run(["sudo", "-n", "tee", path], stdin=text, timeout=60)
        target.run(["sudo", "-n", "systemctl", "daemon-reload"], timeout=120)
        target.run(["sudo", "-n", "systemctl", "enable", "--now", f"{name}.service"], timeout=120)
        return
    target.run(["mkdir", "-p", str(Path(path).parent)], timeout=60)
    _put_texts(target, str(Path(path).parent), {Path(path).name: text})
    target.run(["systemctl", "--user", "daemon-reload"], timeout=120)
    target.run(["systemctl", "--user", "enable", "--now", f"{name}.service"], timeout=120)
    if not head.linger:
        linger = target.run(["loginctl", "enable-linger", head.user], check=False, timeout=60)
        if not linger.ok:
            raise CheckFailed(f"the supervisor runs as a systemd user service, but linger could not be "
                              f"enabled ({linger.stderr.strip()[:200]}): it stops at logout and does not "
                              f"start after a reboot until {head.user} logs in; ask an administrator for "
                              f"`loginctl enable-linger {head.user}`")


def _remove_running(target: Target, name: str) -> None:
    """Whatever of the supervisor runs, each way: stopped and removed (units disabled, kept on disk)."""
    for argv in (["sudo", "-n", "systemctl", "disable", "--now", f"{name}.service"],
                 ["systemctl", "--user", "disable", "--now", f"{name}.service"],
                 ["docker", "rm", "--force", name]):
        target.run(argv, check=False, timeout=120)


def uninstall(cluster: Cluster, report=lambda line: None) -> list[str]:
    """Remove the supervisor (container or units, its folder, its image) and copy the head's record
    back here (its history stays beside the head's record); anything of it still there afterwards
    is refused (CheckFailed). Returns what was removed."""
    target = connect(cluster.head)
    try:
        found = look(cluster, target)
        removed = []
        if not (found.installed or found.units or found.running.get("container")):
            return removed
        home = target.home()
        name = name_of(cluster)
        _remove_running(target, name)
        for path in found.units:
            target.run(["sudo", "-n", "rm", "-f", path] if path.startswith("/etc/") else ["rm", "-f", path],
                       check=False, timeout=60)
        target.run(["rm", "-rf", f"{home}/{CONFIG_DIR}/{cluster.name}"], timeout=60)
        target.run(["rmdir", f"{home}/{CONFIG_DIR}"], check=False, timeout=60)   # where no other cluster's
        if found.record and found.record.get("image"):
            target.run(["docker", "image", "rm", found.record["image"]], check=False, timeout=120)
        removed = [f"{found.record.get('mode', '?') if found.record else 'leftover'} supervisor {name}",
                   *found.units]
        if found.deployments:
            kept = ("current", "last_good", "good")
            state.record(cluster, **{key: found.deployments[key] for key in kept if key in found.deployments})
            report("the head's record of the deployments is this machine's again")
        left = look(cluster, target)
        config = target.run(["ls", "-A", f"{home}/{CONFIG_DIR}/{cluster.name}"], check=False, timeout=60)
    finally:
        target.close()
    if left.installed or left.units or left.running.get("container") or config.ok:
        raise CheckFailed(f"uninstall: the supervisor is still there: {left.as_json()}")
    return removed
