"""``invoke ssh.setup``: node keys made on their nodes, trusted everywhere, host keys pinned.

The parsing and planning are pure and tested table-driven; the rest runs on the session's
testbed (real sshd on three nodes), whose ~/.ssh every test here leaves as it found it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest
from invoke import Context
from invoke.exceptions import Exit

from conftest import docker_unusable
from trtllm_deploy.cli import ssh as ssh_cli
from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts import inventory, knownhosts, sshkeys, sshsetup
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.serving import containers

needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))

ED_A = knownhosts.PublicKey("ssh-ed25519", base64.b64encode(b"\0\0\0\x0bssh-ed25519key-a").decode())
ED_B = knownhosts.PublicKey("ssh-ed25519", base64.b64encode(b"\0\0\0\x0bssh-ed25519key-b").decode())
RSA = knownhosts.PublicKey("ssh-rsa", base64.b64encode(b"\0\0\0\x07ssh-rsa-key").decode())


def _hashed(name: str) -> str:
    salt = b"0123456789abcdefghij"
    mac = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(mac).decode()}"


# --- pure: reading keys and known_hosts ---------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    (f"{ED_A.line}", ED_A),
    (f"{ED_A.line} spark@spark-1", ED_A),
    (f'from="10.0.0.0/8",command="echo a b" {ED_A.line} c', ED_A),
    ("# a comment", None),
    ("", None),
], ids=["bare", "comment", "options", "comment-line", "blank"])
def test_a_key_is_found_after_options_and_before_comments(line, expected):
    assert knownhosts.find_key(line) == expected


@pytest.mark.parametrize("text, name, pinned, revoked", [
    (f"10.0.0.2 {ED_A.line}\n", "10.0.0.2", [ED_A], []),
    (f"[10.0.0.2]:2222 {ED_A.line}\n", "10.0.0.2", [], []),
    (f"[10.0.0.2]:2222 {ED_A.line}\n", "[10.0.0.2]:2222", [ED_A], []),
    (f"spark-2,10.0.0.2 {ED_A.line}\n", "10.0.0.2", [ED_A], []),
    (f"{_hashed('10.0.0.2')} {ED_A.line}\n", "10.0.0.2", [ED_A], []),
    (f"{_hashed('10.0.0.3')} {ED_A.line}\n", "10.0.0.2", [], []),
    (f"10.0.0.* {ED_A.line}\n", "10.0.0.2", [ED_A], []),
    (f"10.0.0.*,!10.0.0.2 {ED_A.line}\n", "10.0.0.2", [], []),
    (f"@revoked * {ED_B.line}\n10.0.0.2 {ED_A.line}\n", "10.0.0.2", [ED_A], [ED_B]),
    (f"@cert-authority * {ED_B.line}\n", "10.0.0.2", [], []),
    (f"10.0.0.2 {ED_A.line}\n10.0.0.2 {RSA.line}\n10.0.0.2 {ED_B.line}\n", "10.0.0.2",
     [ED_A, RSA, ED_B], []),
    (f"# 10.0.0.2 {ED_A.line}\n\n10.0.0.2\n", "10.0.0.2", [], []),
], ids=["plain", "other-port", "port", "two-names", "hashed", "hashed-other", "wildcard",
        "negated", "revoked", "cert-authority", "several-keys", "comment-blank-keyless"])
def test_known_hosts_lookup_follows_openssh(text, name, pinned, revoked):
    found = knownhosts.pins(text, name)
    assert (found.keys, found.revoked) == (pinned, revoked)


def test_the_matching_lines_are_kept_as_written_for_another_openssh():
    hashed = f"{_hashed('10.0.0.2')} {ED_A.line}"
    text = f"{hashed}\n10.0.0.3 {ED_B.line}\n@revoked 10.0.0.* {RSA.line} old\n"
    assert knownhosts.pins(text, "10.0.0.2").lines == [hashed, f"@revoked 10.0.0.* {RSA.line} old"]


@pytest.mark.parametrize("text, offered, verdict", [
    (f"h {ED_A.line}\n", ED_A, knownhosts.PINNED),
    (f"h {ED_A.line}\nh {ED_B.line}\n", ED_B, knownhosts.PINNED),
    (f"h {ED_A.line}\n", ED_B, knownhosts.CHANGED),
    (f"h {RSA.line}\n", ED_A, knownhosts.UNKNOWN),
    ("", ED_A, knownhosts.UNKNOWN),
    (f"h {ED_A.line}\n@revoked h {ED_A.line}\n", ED_A, knownhosts.REVOKED),
], ids=["pinned", "one-of-several", "changed", "other-type-only", "nothing", "revoked"])
def test_an_offered_key_is_judged_as_openssh_would(text, offered, verdict):
    assert knownhosts.judge(knownhosts.pins(text, "h"), offered) == verdict


def test_the_rsh_agent_gets_the_lines_that_pin_each_node(tmp_path):
    known_hosts = tmp_path / "known_hosts"
    hashed = f"{_hashed('10.0.0.2')} {ED_A.line}"
    known_hosts.write_text(f"{hashed}\n[10.0.0.3]:2222 {ED_B.line} c\n10.0.0.4 {RSA.line}\n"
                           f"@revoked 10.0.0.* {RSA.line}\n")
    hosts = tmp_path / "hosts.toml"
    node = '[[nodes]]\nname = "{}"\naddress = "{}"\nport = {}\nknown_hosts = "%s"\n' % known_hosts
    hosts.write_text(node.format("spark-1", "10.0.0.2", 22) + 'role = "head"\n'
                     + node.format("spark-2", "10.0.0.3", 2222))
    lines = containers.known_hosts_lines(inventory.load(hosts))
    assert lines == f"{hashed}\n@revoked 10.0.0.* {RSA.line}\n[10.0.0.3]:2222 {ED_B.line} c\n"
    hosts.write_text(node.format("spark-1", "10.0.0.9", 22) + 'role = "head"\n')
    with pytest.raises(InputError, match="spark-1: no pinned host key for 10.0.0.9"):
        containers.known_hosts_lines(inventory.load(hosts))


def test_fingerprint_is_what_ssh_keygen_prints(tmp_path):
    key = sshkeys.keygen(tmp_path / "k")
    found = knownhosts.find_key(key.with_name("k.pub").read_text())
    assert found.fingerprint == sshkeys.fingerprint(key.with_name("k.pub"))


# --- pure: the plan ------------------------------------------------------------------------------

@pytest.fixture
def two_nodes(tmp_path):
    """A two-node inventory whose known_hosts (this machine's) is a file of the test's."""
    path = tmp_path / "hosts.toml"
    path.write_text(f'[defaults]\nuser = "spark"\nknown_hosts = "{tmp_path / "known_hosts"}"\n\n'
                    '[[nodes]]\nname = "spark-1"\naddress = "10.0.0.1"\nrole = "head"\n\n'
                    '[[nodes]]\nname = "spark-2"\naddress = "10.0.0.2"\nport = 2222\n')
    return inventory.load(path), tmp_path / "known_hosts"


def facts(node, key=None, authorized="", known_hosts="", reported=(), scanned=None, modes=None):
    return sshsetup.NodeFacts(node, key, authorized, known_hosts, modes or {"ssh_dir": "700"},
                              tuple(reported), tuple(reported if scanned is None else scanned))


def test_plan_adds_every_key_everywhere_and_host_keys_by_address_and_name(two_nodes):
    cluster, local = two_nodes
    one, two = cluster.nodes
    local.write_text(f"10.0.0.1 {ED_A.line}\n[10.0.0.2]:2222 {ED_B.line}\n")
    plan = sshsetup.make_plan(cluster, [facts(one, key=ED_A, reported=[ED_A, RSA], scanned=[ED_A, RSA]),
                                        facts(two, key=None, reported=[ED_B])])
    assert not plan.refusals
    first, second = plan.nodes
    assert (first.create_key, second.create_key) == (False, True)
    assert first.authorize == second.authorize == ["spark-1", "spark-2"]
    assert f"10.0.0.1,spark-1 {ED_A.line}" in first.known_hosts
    assert f"[10.0.0.2]:2222,[spark-2]:2222 {ED_B.line}" in second.known_hosts
    # this machine pinned spark-1's ed25519 already; its RSA key is pinned because the node holds it
    assert plan.local == {str(local): [f"10.0.0.1 {RSA.line}"]}


def test_plan_is_up_to_date_when_everything_is_there(two_nodes):
    cluster, local = two_nodes
    one, two = cluster.nodes
    local.write_text(f"10.0.0.1 {ED_A.line}\n[10.0.0.2]:2222 {ED_B.line}\n")
    known = f"10.0.0.1,spark-1 {ED_A.line}\n{_hashed('[10.0.0.2]:2222')} {ED_B.line}\n" \
            f"[spark-2]:2222 {ED_B.line}\n"
    authorized = f'restrict {ED_A.line} x\n{ED_B.line}'  # options and comments do not matter
    plan = sshsetup.make_plan(cluster, [
        facts(one, key=ED_A, authorized=authorized, known_hosts=known, reported=[ED_A],
              modes={"ssh_dir": "700", "authorized_keys": "600"}),
        facts(two, key=ED_B, authorized=authorized, known_hosts=known, reported=[ED_B])])
    assert plan.up_to_date, plan.as_json()


@pytest.mark.parametrize("case, expected", [
    ("scan-not-held", "NOT THE NODE'S KEY"),
    ("nothing-scanned", "ssh-keyscan got no host key"),
    ("node-reports-none", "reports no host key"),
    ("changed-here", "HOST KEY CHANGED for 10.0.0.1"),
    ("changed-on-node", "HOST KEY CHANGED for [10.0.0.2]:2222"),
    ("revoked", "@revoked"),
])
def test_plan_refuses_keys_it_cannot_trust(two_nodes, case, expected):
    cluster, local = two_nodes
    one, two = cluster.nodes
    local.write_text(f"10.0.0.1 {ED_B.line if case == 'changed-here' else ED_A.line}\n")
    first = dict(key=ED_A, reported=[ED_A])
    second = dict(key=ED_B, reported=[ED_B])
    if case == "scan-not-held":
        first["scanned"] = [ED_B]
    elif case == "nothing-scanned":
        first["scanned"] = []
    elif case == "node-reports-none":
        first.update(reported=[], scanned=[ED_A])
    elif case == "changed-on-node":
        first["known_hosts"] = f"[10.0.0.2]:2222 {ED_A.line}\n"
    elif case == "revoked":
        second["known_hosts"] = f"@revoked * {ED_A.line}\n"
    plan = sshsetup.make_plan(cluster, [facts(one, **first), facts(two, **second)])
    assert any(expected in refusal for refusal in plan.refusals), plan.refusals
    with pytest.raises(CheckFailed, match="nothing was written"):
        sshsetup.apply(plan)


STRANGER = knownhosts.PublicKey("ssh-ed25519", base64.b64encode(b"\0\0\0\x0bssh-ed25519stranger").decode())


@pytest.mark.parametrize("pinned_here, scanned", [
    ("", [STRANGER]),
    ("", [ED_A, STRANGER]),
    ("", [STRANGER, ED_A]),
    (f"10.0.0.1 {ED_A.line}\n", [STRANGER]),
], ids=["nothing-pinned-yet", "beside-its-own-key", "before-its-own-key", "pinned-here-too"])
def test_a_scanned_key_the_node_does_not_hold_is_refused_and_pinned_nowhere(two_nodes, pinned_here, scanned):
    """Only this check sees a stranger where nothing is pinned yet: no known_hosts disagrees."""
    cluster, local = two_nodes
    one, two = cluster.nodes
    local.write_text(pinned_here)
    plan = sshsetup.make_plan(cluster, [facts(one, key=ED_A, reported=[ED_A], scanned=scanned),
                                        facts(two, key=ED_B, reported=[ED_B])])
    mine = [refusal for refusal in plan.refusals if "NOT THE NODE'S KEY" in refusal]
    assert len(mine) == 1, plan.refusals
    assert mine[0].startswith("spark-1: NOT THE NODE'S KEY: 10.0.0.1 presents " + STRANGER.shown)
    assert f"its /etc/ssh has {ED_A.shown}" in mine[0]
    # No key of spark-1's is pinned anywhere, the one it does hold included: its address lies.
    assert [row.node for row in plan.host_keys] == ["spark-2"]
    added = [*(line for lines in plan.local.values() for line in lines),
             *(line for step in plan.nodes for line in step.known_hosts)]
    assert added and not [line for line in added if "spark-1" in line or "10.0.0.1" in line
                          or STRANGER.line in line or ED_A.line in line], added
    with pytest.raises(CheckFailed, match="NOT THE NODE'S KEY: 10.0.0.1"):
        sshsetup.apply(plan)


def test_bad_inventory_exits_2_before_any_host_is_touched(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text('[[nodes]]\nname = "spark-1"\naddress = "10.0.0.1"\nprot = 22\n')
    with pytest.raises(Exit) as caught:
        ssh_cli.setup(Context(), hosts=str(path))
    assert caught.value.code == 2
    assert "prot" in str(caught.value.message)


# --- on the testbed ------------------------------------------------------------------------------

def _each(cluster, argv):
    found = {}
    for node in cluster.nodes:
        target = SSH(node)
        try:
            found[node.name] = target.run(argv, check=False)
        finally:
            target.close()
    return found


_STATE = ('cd "$HOME" && stat -c "%n %a" .ssh && find .ssh -type f | sort | xargs sha256sum')


def state(cluster) -> dict[str, str]:
    """Every node's ~/.ssh (names, modes, digests) and this machine's known_hosts files."""
    seen = {name: r.stdout for name, r in _each(cluster, ["sh", "-c", _STATE]).items()}
    for node in cluster.nodes:
        path = Path(node.known_hosts).expanduser()
        seen[f"here:{path}"] = path.read_text() if path.exists() else ""
    return seen


@pytest.fixture
def bed(testbed):
    """The session's testbed; every node's ~/.ssh and this machine's known_hosts are put back."""
    testbed_, _ = testbed
    cluster = testbed_.inventory()
    local = Path(cluster.head.known_hosts).expanduser()
    before = local.read_text()
    _each(cluster, ["sh", "-c", "rm -rf ~/.ssh.before-test && cp -a ~/.ssh ~/.ssh.before-test"])
    yield cluster
    _each(cluster, ["sh", "-c", "rm -rf ~/.ssh && mv ~/.ssh.before-test ~/.ssh"])
    local.write_text(before)


def _from_node(node, to, check=True):
    target = SSH(node)
    try:
        return target.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                           "-o", "ConnectTimeout=5", to.address, "true"], check=check, timeout=30)
    finally:
        target.close()


@needs_docker
def test_setup_lets_every_node_reach_every_node_and_a_second_run_changes_nothing(bed, capsys):
    worker = bed.nodes[1]
    _each(bed, ["rm", "-f", ".ssh/id_ed25519", ".ssh/id_ed25519.pub", ".ssh/known_hosts"])
    assert not _from_node(bed.head, worker, check=False).ok  # nothing trusted yet
    untouched = state(bed)

    ssh_cli.setup(Context(), hosts=_hosts(bed), dry_run=True, json=True)
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and not dry["up_to_date"]
    assert all(step["create_key"] for step in dry["nodes"])
    assert state(bed) == untouched, "--dry-run changed something"

    ssh_cli.setup(Context(), hosts=_hosts(bed), json=True)
    done = json.loads(capsys.readouterr().out)["nodes_done"]
    assert [row["key"] for row in done] == ["created"] * 3
    assert all(row["authorized_keys_added"] == 3 for row in done)
    for node in bed.nodes:
        for other in bed.nodes:
            if other is not node:
                _from_node(node, other)  # raises with ssh's own words if refused

    after = state(bed)
    ssh_cli.setup(Context(), hosts=_hosts(bed))
    assert "up to date" in capsys.readouterr().out
    assert state(bed) == after, "a second run changed something"

    # Each node's private key is on that node only: no file elsewhere holds a key whose public
    # half is another node's (checked on the nodes with ssh-keygen -y, so no key moves to look).
    publics = {row["node"]: row["fingerprint"] for row in done}
    scan = ('for f in $(grep -rlI -e "PRIVATE KEY" /home /root /tmp /etc /run /var/tmp 2>/dev/null);'
            ' do ssh-keygen -lf "$f" 2>/dev/null || ssh-keygen -y -P "" -f "$f" 2>/dev/null'
            ' | ssh-keygen -lf - 2>/dev/null; done; true')
    for name, result in _each(bed, ["sh", "-c", scan]).items():
        for other, fingerprint in publics.items():
            if other != name:
                assert fingerprint not in result.stdout, f"{other}'s private key is on {name}"
    here = [Path(bed.head.known_hosts).expanduser().parent, Path(os.environ["HOME"])]
    for folder in here:
        for path in folder.rglob("*"):
            if path.is_file() and b"PRIVATE KEY" in path.read_bytes():
                derived = sshkeys._ssh_keygen("-y", "-P", "", "-f", str(path))
                assert knownhosts.find_key(derived).fingerprint not in publics.values(), path


def _hosts(cluster) -> str:
    return str(Path(cluster.head.known_hosts).expanduser().parent / "hosts.toml")


@needs_docker
def test_a_node_presenting_another_host_key_than_pinned_is_refused_with_nothing_written(bed, tmp_path):
    # This machine pins a key spark-2 does not have: what a man-in-the-middle would present.
    stranger = sshkeys.keygen(tmp_path / "stranger")
    pinned = tmp_path / "known_hosts"
    worker = bed.nodes[1]
    lines = [line for line in Path(bed.head.known_hosts).expanduser().read_text().splitlines()
             if not line.startswith(f"{worker.address} ")]
    pinned.write_text("\n".join([*lines, f"{worker.address} {sshkeys.public_key(stranger)}"]) + "\n")
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(Path(_hosts(bed)).read_text().replace(
        str(Path(bed.head.known_hosts).expanduser()), str(pinned)))
    before = state(bed)
    pinned_before = pinned.read_text()
    with pytest.raises(Exit) as caught:
        ssh_cli.setup(Context(), hosts=str(hosts))
    assert caught.value.code == 1
    assert "HOST KEY CHANGED" in caught.value.message
    assert state(bed) == before and pinned.read_text() == pinned_before

    # A node's own known_hosts pinning another key for a node: refused too, nothing written.
    target = SSH(bed.head)
    try:
        target.run(["sh", "-c", 'printf "%s\\n" "$1" >> ~/.ssh/known_hosts', "sh",
                    f"{worker.address} {sshkeys.public_key(stranger)}"])
    finally:
        target.close()
    before = state(bed)
    with pytest.raises(Exit) as caught:
        ssh_cli.setup(Context(), hosts=_hosts(bed))
    assert f"{bed.head.name}: HOST KEY CHANGED for {worker.address}" in caught.value.message
    assert state(bed) == before
