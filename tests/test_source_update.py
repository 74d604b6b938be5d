"""`source.update` on a build node reached through the local connection, against the stand-in
TensorRT-LLM repository (tests/trtllm_repo.py) with real git: required fixes, reverts of them, the
ones only several nodes need, Unicode subjects and the user's comments in the lock.

No Docker: the base image is named in the lock, so nothing asks an engine for it (a digest is
only looked up, and an engine that does not answer leaves the reference as it is).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from trtllm_deploy.cli.pinned_interface import ProjectInterface
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts import inventory
from trtllm_deploy.hosts.local import Local
from trtllm_deploy.source import advise, pin
from trtllm_deploy.source import lock as locks
from trtllm_deploy.source import lockcheck
from trtllm_deploy.source.tree import Checkout, reverts
from trtllm_deploy.runtimes import interface
from trtllm_repo import DROPPED_FLAG, EMOJI_SUBJECT, INTERFACE_DATA, Upstream, make_upstream

ROOT = Path(__file__).resolve().parents[1]
BASE = "example.invalid/pytorch:25.10-py3"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Upstream:
    return make_upstream(tmp_path_factory.mktemp("upstream"), base_image=BASE)


@pytest.fixture
def hosts(tmp_path) -> Path:
    """A one-node cluster: this machine, its build folder under the test's own folder."""
    path = tmp_path / "hosts.toml"
    path.write_text(f'[[nodes]]\nname = "builder"\nconnection = "local"\nrole = "head"\n\n'
                    f'[nodes.paths]\nbuild = "{tmp_path / "build"}"\nstate = "{tmp_path / "state"}"\n')
    return path


@pytest.fixture(autouse=True)
def no_docker(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent")


def lock_text(upstream: Upstream, fixes: str = "") -> str:
    return (f'[source]\nrepository = "{upstream.url}"\nref = "main"\n\n[build]\n'
            f'base_image = "{BASE}"\ncuda_archs = "121-real"\n' + fixes)


def write_lock(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tensorrt-llm.lock.toml"
    path.write_text(text, encoding="utf-8")
    return path


def update(hosts: Path, lock: Path, ref: str | None = None, **kwargs) -> pin.UpdateReport:
    """pin.update as `invoke source.update` runs it (the project's interface checked)."""
    return pin.update(inventory.load(hosts), lock, ref, interface=ProjectInterface(), **kwargs)


def invoke(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DOCKER_HOST": "unix:///nonexistent"})


SEVERAL = '\n[[fixes]]\npr = 15559\nneeded_for = "several"\n'
ANY_8803 = "\n[[fixes]]\npr = 8803\n"


# --- reverts ------------------------------------------------------------------------------------

def test_a_required_fix_reverted_later_is_missing_and_the_revert_is_named(upstream, hosts, tmp_path):
    lock = write_lock(tmp_path, lock_text(upstream, ANY_8803))
    before = lock.read_text()
    done = invoke("source.update", "--hosts", str(hosts), "--lock", str(lock), "--ref", upstream.revert_a)
    assert done.returncode == 1, done.stderr
    assert upstream.revert_a[:12] in done.stderr
    assert upstream.subjects["revert_a"] in done.stderr  # the revert's own subject
    assert "(#8803)" in done.stderr and "Traceback" not in done.stderr
    assert lock.read_text() == before  # refused: nothing written


@pytest.mark.parametrize("ref, present", [("fix_a", True), ("tip", True), ("revert_a", False),
                                          ("reapply_a", True), ("revert_emoji", True)],
                         ids=["the-fix", "later", "reverted", "revert-reverted", "after-both"])
def test_a_revert_of_the_revert_brings_the_fix_back(upstream, hosts, tmp_path, ref, present):
    lock = write_lock(tmp_path, lock_text(upstream, ANY_8803))
    if not present:
        with pytest.raises(CheckFailed, match=f"reverted by {upstream.revert_a[:12]}"):
            update(hosts, lock, upstream.commit(ref))
        return
    report = update(hosts, lock, upstream.commit(ref))
    fix = locks.load(lock).lock.fixes[0]
    assert (fix.commit, fix.missing) == (upstream.fix_a, None)
    assert not [warning for warning in report.warnings if "one node" in warning]


CHAIN = {"f" * 40: (0, "[None][fix] Disable symmetric all-reduce on GB10 (#12902)")}
R1 = "1" * 40
CHAIN_R1 = CHAIN | {R1: (1, 'Revert "[None][fix] Disable symmetric all-reduce on GB10 (#12902)" (#13001)')}


@pytest.mark.parametrize("subject, body, chain, expected", [
    ('Revert "[None][fix] Disable symmetric all-reduce on GB10 (#12902)" (#13001)', "", CHAIN, "f" * 40),
    ('Revert "[None][fix] Disable symmetric all-reduce on GB10 (#12902)"', "", CHAIN, "f" * 40),
    ("Revert the GB10 all-reduce change (#13001)", "This reverts commit ffffffffffff.\n", CHAIN, "f" * 40),
    ('Revert "[None][fix] Disable NCCL_SYMMETRIC on GB10 (#12902)" (#13001)', "", CHAIN, "f" * 40),
    ('Revert "Revert "[None][fix] Disable symmetric all-reduce on GB10 (#12902)" (#13001)" (#13050)',
     "", CHAIN_R1, R1),
    ("Reapply the GB10 fix", f"This reverts commit {R1}.", CHAIN_R1, R1),
    ('Revert "[None][fix] Something else (#12903)" (#13002)', "", CHAIN, None),
    ('Revert "[None][fix] Something else (#12903)" (#13002)', "This reverts commit 0123456789ab.",
     CHAIN, None),
], ids=["subject-squash-merged", "subject-git-revert", "body-only", "pr-number-title-edited",
        "revert-of-revert", "revert-of-revert-body-only", "another-pr", "another-commit"])
def test_which_commit_a_revert_undoes(subject, body, chain, expected):
    assert reverts(subject, body, chain, "f" * 40, 12902) == expected


# --- fixes only several nodes need ----------------------------------------------------------------

@pytest.mark.parametrize("ref, missing", [
    ("tip", "no commit for PR #15559 in the history of"),
    ("emoji_fix", None),
    ("revert_emoji", "reverted by"),
], ids=["never-merged", "present", "reverted-by-subject"])
def test_a_fix_only_several_nodes_need_is_recorded_missing_with_a_warning(upstream, hosts, tmp_path,
                                                                          ref, missing):
    lock = write_lock(tmp_path, lock_text(upstream, ANY_8803 + SEVERAL))
    done = invoke("source.update", "--hosts", str(hosts), "--lock", str(lock),
                  "--ref", upstream.commit(ref))
    assert done.returncode == 0, done.stderr
    lockfile = locks.load(lock)
    fix = lockfile.lock.fixes[1]
    assert lockfile.lock.fixes[0].missing is None
    if missing is None:
        assert fix.missing is None and fix.commit == upstream.emoji_fix
        assert "serves on one node only" not in done.stderr
        assert lockfile.missing_fixes(across_nodes=True) == []
        return
    assert missing in fix.missing
    if ref == "revert_emoji":
        assert upstream.revert_emoji[:12] in fix.missing and fix.commit == upstream.emoji_fix
        assert upstream.revert_emoji[:12] in done.stderr
    assert "warning: serves on one node only" in done.stderr and "#15559" in done.stderr
    assert lockfile.missing_fixes(across_nodes=True) == [fix]
    assert lockfile.missing_fixes(across_nodes=False) == []
    assert lockcheck.check_offline(lock) == []  # a "several" fix may be recorded missing


def test_fetch_and_advise_judge_the_fixes_as_update_does(upstream, hosts, tmp_path):
    lock = write_lock(tmp_path, lock_text(upstream, ANY_8803 + SEVERAL))
    update(hosts, lock, upstream.revert_emoji)
    lockfile = locks.load(lock)
    fetched = pin.fetch(inventory.load(hosts), lockfile)
    assert fetched.commit == upstream.revert_emoji
    assert len(fetched.warnings) == 1 and "serves on one node only" in fetched.warnings[0]
    tree = Checkout(Local(), fetched.directory, upstream.url)
    usable, said = advise._fixes_in(tree, upstream.revert_emoji, lockfile.lock.fixes, "")
    assert usable is True and said.startswith("serves on one node only") and "#15559" in said
    usable, said = advise._fixes_in(tree, upstream.revert_a, lockfile.lock.fixes, "")
    assert usable is False and upstream.revert_a[:12] in said
    with pytest.raises(CheckFailed, match=upstream.revert_a[:12]):
        pin.fetch(inventory.load(hosts), locks.LockFile(lock, lockfile.lock.model_copy(update={
            "source": lockfile.lock.source.model_copy(update={"commit": upstream.revert_a})})))


# --- Unicode --------------------------------------------------------------------------------------

def test_a_fix_subject_in_any_unicode_round_trips_through_the_lock(upstream, hosts, tmp_path):
    lock = write_lock(tmp_path, lock_text(upstream, SEVERAL))
    report = update(hosts, lock, upstream.emoji_fix)
    text = lock.read_bytes().decode("utf-8")
    assert tomllib.loads(text)["fixes"][0]["title"] == EMOJI_SUBJECT
    assert locks.load(lock).lock == report.after
    assert report.after.fixes[0].title == EMOJI_SUBJECT
    again = update(hosts, lock, upstream.emoji_fix)
    assert again.changed is False and lock.read_bytes().decode("utf-8") == text


# --- the user's comments ------------------------------------------------------------------------

COMMENTED = """\
# Our cluster's pin. Reviewed by the platform team.
lock_hash = "{hash}"

# Where the source comes from.
[source]
repository = "{url}"  # our mirror
ref = "{ref}"        # we follow main
commit = "{commit}"
# version: written by source.update

# Built on spark-1.
[build]
kind = "source"  # not the release image
base_image = "{base}"
cuda_archs = "121-real"    # GB10
make_target = "release_build"
jobs = 0  # 0: sized from the build node's memory at build time
options = {{}}  # nothing extra

# ---- required fixes ----
[[fixes]]
# the hang we saw in March
pr = 8803

# between the fixes: keep this
[[fixes]]
pr = 15559  # NCCL window registration
needed_for = "several"
# after the last fix
"""


def test_an_update_that_moves_the_commit_keeps_every_comment(upstream, hosts, tmp_path):
    text = COMMENTED.format(hash="0" * 64, url=upstream.url, ref="main", commit=upstream.tagged,
                            base=BASE)
    lock = write_lock(tmp_path, text)
    report = update(hosts, lock, upstream.emoji_fix)
    written = lock.read_text(encoding="utf-8")
    assert report.after.source.commit == upstream.emoji_fix != upstream.tagged
    for line in text.splitlines():
        if "#" in line and not line.startswith(("commit", "lock_hash", "ref")):
            assert line in written, line
    assert f'commit = "{upstream.emoji_fix}"' in written
    assert f'lock_hash = "{report.after.lock_hash}"' in written
    assert written.index("# between the fixes: keep this") < written.index("pr = 15559")
    assert written.index("# the hang we saw in March") < written.index("pr = 8803")
    assert locks.load(lock).lock == report.after
    assert lockcheck.check_offline(lock) == []


def test_dry_run_writes_nothing_and_reports_the_hash(upstream, hosts, tmp_path):
    lock = write_lock(tmp_path, lock_text(upstream, ANY_8803))
    before = lock.read_text()
    report = update(hosts, lock, upstream.tip, dry_run=True)
    assert report.changed and lock.read_text() == before
    assert report.after.lock_hash == locks.lock_hash(report.after)


def test_a_unicode_subject_read_over_ssh_round_trips_too(upstream, sshd, tmp_path):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[cluster]\nname = "test"\n\n' + sshd.node_toml("builder") +
                     f'\n[nodes.paths]\nbuild = "{tmp_path / "build"}"\nstate = "{tmp_path / "state"}"\n')
    lock = write_lock(tmp_path, lock_text(upstream, ANY_8803 + SEVERAL))
    report = update(hosts, lock, upstream.revert_emoji)
    text = lock.read_bytes().decode("utf-8")
    fix = tomllib.loads(text)["fixes"][1]
    assert fix["title"] == EMOJI_SUBJECT and EMOJI_SUBJECT in fix["missing"]
    assert locks.load(lock).lock == report.after


# --- the interface of the new pin --------------------------------------------------------------

def shipped_lock(upstream: Upstream, tmp_path: Path) -> Path:
    """The project's own lock, pointed at the stand-in repository (and pinned to its tip, where the
    shipped lock pins nothing yet)."""
    text = (ROOT / locks.DEFAULT_PATH).read_text(encoding="utf-8").replace(
        "https://github.com/NVIDIA/TensorRT-LLM.git", upstream.url)
    return write_lock(tmp_path, text)


def test_an_update_to_a_pin_that_lacks_a_flag_the_project_uses_is_refused_naming_it(upstream, hosts,
                                                                                   tmp_path):
    lock = shipped_lock(upstream, tmp_path)
    before = lock.read_text()
    done = invoke("source.update", "--hosts", str(hosts), "--lock", str(lock), "--ref", upstream.lacks_flag,
                  "--dry-run")
    assert done.returncode == 1, done.stderr
    assert f"trtllm-serve flag {DROPPED_FLAG}: " in done.stderr
    assert f"TensorRT-LLM {upstream.versions['lacks_flag']}" in done.stderr   # the pinned version
    assert "runtimes/trtllm.py program()" in done.stderr                      # where it is used
    assert "--accept-interface-changes" in done.stderr and "Traceback" not in done.stderr
    assert lock.read_text() == before
    # The commit before it has every flag: the same update goes through (the fixes only several
    # nodes need are not in the stand-in: warned, not refused).
    done = invoke("source.update", "--hosts", str(hosts), "--lock", str(lock), "--ref", upstream.gpt_oss,
                  "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    assert "serves on one node only" in done.stderr and "interface" not in done.stderr
    accepted = invoke("source.update", "--hosts", str(hosts), "--lock", str(lock), "--ref",
                      upstream.lacks_flag, "--dry-run", "--accept-interface-changes", "--json")
    assert accepted.returncode == 0, accepted.stderr
    assert f"accepted interface change: trtllm-serve flag {DROPPED_FLAG}" in accepted.stderr
    assert lock.read_text() == before   # a dry run


def test_a_written_pin_records_its_interface_beside_the_lock(upstream, hosts, tmp_path):
    lock = write_lock(tmp_path, lock_text(upstream))
    recorded = pin.interface_dir(lock)
    assert recorded == tmp_path / "interface" / "tensorrt-llm"
    report = update(hosts, lock, upstream.lacks_flag, accept_interface_changes=True)
    assert report.interface_data == recorded and report.interface_gaps
    data = interface.load(recorded)
    assert (data.commit, data.version) == (upstream.lacks_flag, upstream.versions["lacks_flag"])
    assert DROPPED_FLAG not in data.cli.by_flag("serve")
    # Back to a commit with the interface as the project records it: the same files again.
    report = update(hosts, lock, upstream.gpt_oss)
    assert report.interface_gaps == [] and interface.load(recorded).commit == upstream.gpt_oss
    for name in ("trtllm_serve_cli.yaml", "llm.yaml", "llm_committed.yaml", "llm_args_models.json"):
        assert (recorded / name).read_text() == (INTERFACE_DATA / name).read_text(), name
    # Nothing to record again for the same commit.
    assert update(hosts, lock, upstream.gpt_oss).interface_data is None


def test_a_pin_whose_tree_does_not_say_its_interface_is_warned_not_refused(upstream, hosts, tmp_path):
    lock = write_lock(tmp_path, lock_text(upstream))
    report = update(hosts, lock, upstream.old)   # before the references were in the tree
    assert any("was not checked" in warning for warning in report.warnings)
    assert report.interface_data is None and not pin.interface_dir(lock).exists()
