"""The TensorRT-LLM lock checked without a build node or the network (``nox -s lock -- --check``):
it loads, its recorded ``lock_hash`` is the hash of its contents, and what ``source.update``
resolves from a pinned commit is resolved and consistent with it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from trtllm_deploy.errors import InputError
from trtllm_deploy.source.lock import DEFAULT_PATH, LockError, Problem, load

# A fix needs its commit when one is pinned: the full SHA source.update reads from the repository,
# or an abbreviated one recorded from a public list of upstream's commits (building needs the full one).
_SHA = re.compile(r"^[0-9a-f]{7,40}$")
_DIGEST = re.compile(r"@sha256:(?![0-9a-f]{64}$)")   # a digest that is not sha256: and 64 hex


def check_offline(path: str | os.PathLike = DEFAULT_PATH) -> list[Problem]:
    """What is wrong with the lock, found without a build node or the network: it loads, the
    recorded ``lock_hash`` is the hash of its contents, and what ``source.update`` resolves from a
    pinned commit is resolved and consistent with it."""
    source = Path(path)
    try:
        lockfile = load(source)
    except LockError as exc:
        return list(exc.problems)
    except InputError as exc:  # not TOML at all: the message already says where
        return [Problem((), str(exc).split("\n", 1)[0].removeprefix(f"{source}: "),
                        "fix the syntax; see https://toml.io for the format")]
    lock, problems = lockfile.lock, []
    update = "run `invoke source.update` on the build node and commit the lock it writes"
    computed = lockfile.hash
    if lock.lock_hash is None:
        problems.append(Problem((), f"no lock_hash recorded (its contents hash to {computed})",
                                f"{update}, or add at the top: lock_hash = \"{computed}\""))
    elif lock.lock_hash != computed:
        problems.append(Problem(("lock_hash",), f"the recorded hash is not the hash of the lock's "
                                f"contents ({computed}): a value that decides the image was "
                                "edited after source.update wrote it",
                                f"{update}, or undo the edit"))
    pinned = lock.source.commit
    if pinned:
        for index, fix in enumerate(lock.fixes):
            if fix.missing:
                if fix.needed_for == "any":
                    problems.append(Problem(("fixes", index, "missing"), f"fix {fix.name} is needed by "
                                            "every deployment, but the lock records it as missing "
                                            f"from {pinned[:12]} ({fix.missing})",
                                            "pin a commit that has it (source.update refuses one "
                                            "without it), or drop the fix"))
            elif not fix.commit or not _SHA.match(fix.commit):
                problems.append(Problem(("fixes", index), f"fix {fix.name} has no commit SHA, "
                                        f"though commit {pinned[:12]} is pinned: it was not checked "
                                        "against the pin", update))
    else:
        # (trtllm_build may be written ahead of a pin: whether the tree still has trtllm-build is
        # known from upstream's own documents; source.update derives it again.)
        for key in ("version", "date"):
            if getattr(lock.source, key) is not None:
                problems.append(Problem(("source", key), f"{key} is recorded but no commit is pinned "
                                        "(source.update records both from one commit)", update))
        if lock.source.submodules:
            problems.append(Problem(("source", "submodules"), "submodule commits are recorded but no "
                                    "commit is pinned", update))
        for index, fix in enumerate(lock.fixes):
            if fix.missing:
                problems.append(Problem(("fixes", index, "missing"), "recorded as missing from a pin, "
                                        "but no commit is pinned", update))
    images = [(("build", "base_image"), lock.build.base_image), (("release", "image"), lock.release.image),
              *[((runtime, "image"), table.image) for runtime, table in lock.runtime_images.items()]]
    for where, image in images:
        if image and _DIGEST.search(image):
            problems.append(Problem(where, f"{image!r}: a digest is sha256: and 64 lowercase hex "
                                    "characters", "copy it again from `docker buildx imagetools "
                                    "inspect` or `docker image inspect`"))
    requirements = lockfile.requirements_path
    if requirements and not requirements.exists():
        problems.append(Problem(("wheel", "requirements"), f"{requirements} does not exist",
                                f"{update} (it writes the requirements file too)"))
    return problems


def check_report(path: str | os.PathLike = DEFAULT_PATH) -> str | None:
    """:func:`check_offline`'s problems as ``file:line: key: message`` lines, or None."""
    source = Path(path)
    problems = check_offline(source)
    if not problems:
        return None
    text = source.read_text(encoding="utf-8", errors="replace") if source.exists() else ""
    return str(LockError(source, text, problems))


def main(argv: list[str]) -> int:
    """``python -m trtllm_deploy.source.lockcheck [--check] [PATH...]``: 1 if any lock is wrong."""
    failed = False
    for name in [arg for arg in argv if arg != "--check"] or [str(DEFAULT_PATH)]:
        report = check_report(name)
        if report:
            print(report, file=sys.stderr)
            failed = True
        else:
            print(f"{name}: consistent (lock_hash {load(name).hash[:16]})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
