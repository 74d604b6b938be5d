"""The TensorRT-LLM source tree on the build node: resolve a ref, fetch the pinned commit exactly,
check the required fixes are in it, and say what the tree can do.

Every git command runs on the build node through its Target (one SSH command each). Nothing here
uses a branch name at build time: the tree is checked out detached at the locked SHA.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from trtllm_deploy.errors import CheckFailed, DeployError
from trtllm_deploy.hosts.targets import Target
from trtllm_deploy.source.lock import Fix, Lock, Source, Submodule

VERSION_FILE = "tensorrt_llm/version.py"
TRTLLM_BUILD_FILE = "tensorrt_llm/commands/build.py"  # the `trtllm-build` entry point
_VERSION = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)
_ARG = re.compile(r"^ARG\s+(BASE_IMAGE|BASE_TAG)=\"?([^\"\s]+)\"?", re.M)


@dataclass(frozen=True)
class Described:
    """What one commit of the tree is."""

    commit: str
    version: str | None
    date: str
    trtllm_build: bool
    submodules: tuple[Submodule, ...]
    base_image: str | None  # from docker/Dockerfile.multi's ARG BASE_IMAGE / BASE_TAG
    ccache: bool            # the tree's image build sets up ccache (build_wheel.py --use_ccache)


@dataclass
class TreeState:
    """How the working tree on the build node stands against the lock."""

    exists: bool
    head: str | None = None
    clean: bool = False
    submodules_ok: bool = False
    lfs_missing: list[str] = field(default_factory=list)

    def matches(self, commit: str) -> bool:
        return (self.exists and self.head == commit and self.clean and self.submodules_ok
                and not self.lfs_missing)


class Checkout:
    """A clone of the TensorRT-LLM repository in ``directory`` on ``target``."""

    def __init__(self, target: Target, directory: str, repository: str, timeout: float = 3600):
        self.target = target
        self.directory = directory
        self.repository = repository
        self.timeout = timeout

    @property
    def _git(self) -> list[str]:
        # A local mirror (file:// or a path; an air-gapped site's copy) has its submodules beside
        # it, and git >= 2.38.1 refuses file transport for submodules unless told it is wanted.
        local = self.repository.startswith(("file://", "/"))
        return ["git", *(["-c", "protocol.file.allow=always"] if local else [])]

    def git(self, *args: str, check: bool = True, timeout: float | None = None):
        return self.target.run([*self._git, "-C", self.directory, *args], check=check,
                               timeout=timeout or self.timeout)

    # --- the repository ----------------------------------------------------------------------

    def ensure_repository(self) -> None:
        """An initialised repository whose ``origin`` is the locked URL (set again if it moved)."""
        exists = self.target.run(["test", "-d", posixpath.join(self.directory, ".git")],
                                 check=False, timeout=60).ok
        if not exists:
            self.target.run(["mkdir", "-p", self.directory], timeout=60)
            self.git("init", "--quiet")
        url = self.git("config", "--get", "remote.origin.url", check=False).stdout.strip()
        if not url:
            self.git("remote", "add", "origin", self.repository)
        elif url != self.repository:
            self.git("remote", "set-url", "origin", self.repository)
        if self.target.run(["test", "-f", posixpath.join(self.directory, ".git", "shallow")],
                           check=False, timeout=60).ok:
            # A shallow clone cannot answer "is this fix an ancestor?": deepen it once.
            self.git("fetch", "--quiet", "--unshallow", "origin")

    def has(self, commit: str) -> bool:
        return self.git("cat-file", "-e", f"{commit}^{{commit}}", check=False, timeout=60).ok

    def fetch(self, commit: str) -> bool:
        """Fetch ``commit`` with its whole history (no branch name involved); False if the
        repository does not have it."""
        if self.has(commit):
            return True
        done = self.git("fetch", "--quiet", "--no-tags", "origin", commit, check=False)
        return done.ok and self.has(commit)

    def resolve(self, ref: str) -> str:
        """A branch, tag or SHA (full or abbreviated) as the full SHA the repository has now."""
        if re.fullmatch(r"[0-9a-f]{7,40}", ref):
            if len(ref) == 40 and self.fetch(ref):
                return ref
            self.git("fetch", "--quiet", "--tags", "origin")
            found = self.git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
            if found.ok:
                return found.stdout.strip()
            raise DeployError(f"{self.repository} has no commit {ref}")
        listing = self.target.run([*self._git, "ls-remote", self.repository, ref,
                                   f"refs/tags/{ref}^{{}}"], check=False, timeout=300)
        if not listing.ok:
            raise DeployError(f"cannot list {self.repository}: {listing.stderr.strip()[-500:]}")
        refs = dict(line.split("\t")[::-1] for line in listing.stdout.splitlines() if "\t" in line)
        for name in (f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", f"refs/heads/{ref}", ref):
            if name in refs:
                return refs[name]
        raise DeployError(f"{self.repository} has no branch or tag {ref!r}")

    def describe(self, commit: str) -> Described:
        """Version, date, submodule SHAs, base image and whether trtllm-build exists at ``commit``."""
        version_file = self.git("show", f"{commit}:{VERSION_FILE}", check=False, timeout=60)
        version = _VERSION.search(version_file.stdout) if version_file.ok else None
        date = self.git("show", "-s", "--format=%cI", commit, timeout=60).stdout.strip()
        has_build = self.git("cat-file", "-e", f"{commit}:{TRTLLM_BUILD_FILE}", check=False,
                             timeout=60).ok
        listing = self.git("ls-tree", "-r", commit, timeout=300).stdout
        submodules = tuple(
            Submodule(path=line.split("\t", 1)[1], commit=line.split()[2])
            for line in listing.splitlines() if line.split(" ", 2)[1:2] == ["commit"])
        dockerfile = self.git("show", f"{commit}:docker/Dockerfile.multi", check=False, timeout=60)
        args = dict(_ARG.findall(dockerfile.stdout)) if dockerfile.ok else {}
        base = (f"{args['BASE_IMAGE']}:{args['BASE_TAG']}" if "BASE_IMAGE" in args and "BASE_TAG" in args
                else None)
        return Described(commit, version.group(1) if version else None, date, has_build,
                         submodules, base, "ccache" in dockerfile.stdout if dockerfile.ok else False)

    def read(self, commit: str, paths) -> dict[str, str | None]:
        """The text of each of ``paths`` at ``commit`` (None where that commit has no such file):
        one listing of the tree, then one ``git show`` per file it has."""
        listed = self.git("ls-tree", "--name-only", commit, "--", *paths, timeout=60).stdout.splitlines()
        return {path: self.git("show", f"{commit}:{path}", timeout=60).stdout if path in listed else None
                for path in paths}

    def resolve_fixes(self, commit: str, fixes) -> list[Fix]:
        """Each required fix as checked against ``commit``'s history, in the order given: found,
        it carries its full SHA (and the commit's subject where no title was given) and no
        ``missing``; not found, or reverted later in that history, ``missing`` says why.

        A fix given by PR number is looked up in the pinned history itself (``(#N)`` in the
        subject, as upstream's squash merges write it); found there, it is an ancestor."""
        checked = []
        for fix in fixes:
            fix = fix.model_copy(update={"missing": None})
            sha, why = self._by_commit(fix.commit, commit) if fix.commit else (None, None)
            if sha is None and fix.pr:
                # No recorded SHA, or one this history lacks (a cherry-pick onto a release branch,
                # a mirror's rewritten history): the PR's own commit in this history, by number.
                sha, also = self._by_pr(fix.pr, commit)
                why = also if why is None else f"{why}; {also}"
            if sha is None:
                checked.append(fix.model_copy(update={"missing": why}))
                continue
            subject = self.git("show", "-s", "--format=%s", sha, timeout=60).stdout.strip()
            moved = bool(fix.commit) and not sha.startswith(fix.commit)   # found by PR instead
            fix = fix.model_copy(update={"commit": sha, "title": subject if moved else fix.title or subject})
            revert = self.reverted(sha, subject, fix.pr, commit)
            if revert:
                fix = fix.model_copy(update={
                    "missing": f'reverted by {revert[0][:12]} "{revert[1]}" in the history of {commit[:12]}'})
            checked.append(fix)
        return checked

    def _by_commit(self, given: str, commit: str) -> tuple[str | None, str | None]:
        """``given`` (full or abbreviated) as a full SHA in ``commit``'s history, or None and why."""
        if not self.fetch(given) and len(given) == 40:
            return None, f"{given[:12]} not found in {self.repository}"
        full = self.git("rev-parse", "--verify", "--quiet", f"{given}^{{commit}}", check=False, timeout=60)
        if not full.ok:
            return None, f"{given[:12]} not found in {self.repository}"
        sha = full.stdout.strip()
        inside = self.git("merge-base", "--is-ancestor", sha, commit, check=False, timeout=300)
        if inside.exit_code == 1:
            return None, f"{given[:12]} not in the history of {commit[:12]}"
        if not inside.ok:
            raise DeployError(f"git merge-base failed: {inside.stderr.strip()}")
        return sha, None

    def _by_pr(self, pr: int, commit: str) -> tuple[str | None, str | None]:
        """The commit of PR ``pr`` in ``commit``'s history (its number in the subject, not a revert
        of it), or None and why."""
        found = self.git("log", "--format=%H%x09%s", "--fixed-strings", f"--grep=(#{pr})", commit,
                         timeout=600).stdout.splitlines()
        found = [line for line in found if "\t" in line and f"(#{pr})" in line.split("\t", 1)[1]
                 and not line.split("\t", 1)[1].startswith("Revert")]
        if not found:
            return None, f"no commit for PR #{pr} in the history of {commit[:12]}"
        return found[-1].split("\t", 1)[0], None   # the oldest: the merge, not a later cherry-pick

    def reverted(self, sha: str, subject: str, pr: int | None, commit: str) -> tuple[str, str] | None:
        """The revert commit (SHA, subject) that leaves ``sha``'s change undone at ``commit``, or
        None where it stands (never reverted, or reverted and then brought back)."""
        listing = self.git("log", "--reverse", "--topo-order", "--format=%H%x1f%s%x1f%b%x1e",
                           "--grep=^Revert", f"{sha}..{commit}", timeout=600).stdout
        chain = {sha: (0, subject)}   # the fix and each revert in its chain: depth, subject
        last = None
        for record in listing.split("\x1e"):
            fields = record.strip("\n").split("\x1f", 2)
            if len(fields) != 3 or not fields[1].startswith("Revert"):
                continue
            revert, revert_subject, body = fields
            target = reverts(revert_subject, body, chain, sha, pr)
            if target is not None:
                chain[revert] = (chain[target][0] + 1, revert_subject)
                last = revert
        if last is not None and chain[last][0] % 2 == 1:
            return last, chain[last][1]
        return None

    # --- the working tree --------------------------------------------------------------------

    def state(self, source: Source) -> TreeState:
        """Where the working tree stands, without touching the network."""
        if not self.target.run(["test", "-d", posixpath.join(self.directory, ".git")],
                               check=False, timeout=60).ok:
            return TreeState(exists=False)
        head = self.git("rev-parse", "--verify", "--quiet", "HEAD", check=False, timeout=60)
        status = self.git("status", "--porcelain", "--ignore-submodules=none", check=False, timeout=300)
        submodules = self.git("submodule", "status", "--recursive", check=False, timeout=300)
        recorded = {s.path: s.commit for s in source.submodules}
        seen = {}
        for line in submodules.stdout.splitlines():
            flag, sha, path = line[:1], line[1:].split()[0], line[1:].split()[1]
            seen[path] = sha if flag == " " else f"{flag}{sha}"
        lfs = self.git("lfs", "ls-files", check=False, timeout=300)
        missing = [line.split(" - ", 1)[1] for line in lfs.stdout.splitlines() if " - " in line]
        return TreeState(True, head.stdout.strip() or None, status.ok and not status.stdout.strip(),
                         submodules.ok and all(seen.get(path) == sha for path, sha in recorded.items()),
                         missing if lfs.ok else ["(git lfs is not installed on the build node)"])

    def check_out(self, source: Source) -> None:
        """The tree at exactly the locked commit, its submodules at their SHAs, LFS objects in."""
        if not self.fetch(source.commit):
            raise DeployError(f"{self.repository} has no commit {source.commit}; the lock points at "
                              "something the repository does not have (rewritten history?)")
        self.git("checkout", "--quiet", "--detach", "--force", source.commit)
        self.git("submodule", "sync", "--quiet", "--recursive")
        self.git("submodule", "update", "--init", "--recursive", "--force")
        lfs = self.git("lfs", "install", "--local", check=False, timeout=60)
        if not lfs.ok:
            raise DeployError("git-lfs is not installed on the build node: TensorRT-LLM keeps "
                              "binaries in LFS (sudo apt-get install -y git-lfs)")
        self.git("lfs", "pull")


def lock_from(described: Described, lock: Lock | None, repository: str, ref: str,
              base_image: str | None) -> Lock:
    """The lock after ``source.update``: the new commit's facts, the rest kept from ``lock``."""
    source = Source(repository=repository, ref=ref, commit=described.commit,
                    version=described.version, date=described.date,
                    trtllm_build=described.trtllm_build, submodules=list(described.submodules))
    base = base_image or (lock.build.base_image if lock else None) or described.base_image
    if base_image and lock:
        lock = lock.model_copy(update={"build": lock.build.model_copy(update={"base_image": base})})
    if not base:
        raise DeployError("no base image: the tree names none in docker/Dockerfile.multi; pass "
                          "--base-image (e.g. nvcr.io/nvidia/pytorch:25.10-py3)")
    if lock:
        build = lock.build.model_copy(update={"base_image": lock.build.base_image or base})
        return lock.model_copy(update={"source": source, "build": build})
    from trtllm_deploy.source.lock import Build

    return Lock(source=source, build=Build(base_image=base))


# `git revert` writes "This reverts commit <sha>." in the body; GitHub's revert button and a squash
# merge give the subject 'Revert "<the reverted subject>" (#<the revert's PR>)'.
_REVERTS_COMMIT = re.compile(r"This reverts commit ([0-9a-f]{7,40})")
_REVERT_SUBJECT = re.compile(r'^Revert "(.*)"(?: \(#\d+\))?$')


def reverts(subject: str, body: str, chain: dict[str, tuple[int, str]], fix: str,
            pr: int | None) -> str | None:
    """Which commit of ``chain`` (the fix, and the reverts of it seen so far) the revert commit
    with ``subject`` and ``body`` undoes, or None if it undoes none of them."""
    for named in _REVERTS_COMMIT.findall(body):
        for sha in chain:
            if sha.startswith(named):
                return sha
    quoted = _REVERT_SUBJECT.match(subject)
    if not quoted:
        return None
    inner = quoted.group(1)
    for sha, (_, reverted_subject) in reversed(chain.items()):  # the newest first
        if inner == reverted_subject:
            return sha
    # The reverted PR's number in the quoted subject (its title edited since).
    if pr and not inner.startswith("Revert") and f"(#{pr})" in inner:
        return fix
    return None


def missing_from(fixes: list[Fix]) -> list[Fix]:
    return [fix for fix in fixes if fix.missing]


def one_node_only(fixes: list[Fix]) -> list[str]:
    """A warning for each fix a pin lacks that only a deployment across nodes needs."""
    return [f"serves on one node only: {fix.name} is missing ({fix.missing}); tensor parallelism "
            "across nodes is refused on this pin" for fix in fixes
            if fix.missing and fix.needed_for == "several"]


def require_fixes(fixes: list[Fix], commit: str) -> list[str]:
    """Refuse a pin that lacks a fix every deployment needs; the warnings for those that only a
    deployment across nodes needs (the pin serves on one node)."""
    refused = [fix for fix in fixes if fix.missing and fix.needed_for == "any"]
    if refused:
        lines = [f"{len(refused)} required fix(es) missing from {commit[:12]}:"]
        lines += [f"  {fix.name}: {fix.missing}" for fix in refused]
        lines.append("  what to do: pin a release tag that holds it (invoke source.update --ref vX.Y.Z; "
                     "invoke upstream says which releases hold the fixes), or drop the fix from "
                     "[[fixes]] if you know you do not need it")
        raise CheckFailed("\n".join(lines))
    return one_node_only(fixes)

