"""The TensorRT-LLM lock, CUDA_ARCHS coverage and compile-job sizing: pure, table-driven."""

from __future__ import annotations

import shlex
import subprocess
import tomllib
import sys
from pathlib import Path

import pytest

from trtllm_deploy.errors import DeployError
from trtllm_deploy.source import cuda, wheel
from trtllm_deploy.source import make, plan
from trtllm_deploy.source import lock as locks
from trtllm_deploy.source import lockcheck

ROOT = Path(__file__).resolve().parents[1]
SHA = "a" * 40
OTHER = "b" * 40

GOOD = f"""\
[source]
repository = "https://github.com/NVIDIA/TensorRT-LLM.git"
ref = "main"
commit = "{SHA}"
version = "1.3.0rc1"

[[source.submodules]]
path = "3rdparty/cutlass"
commit = "{OTHER}"

[build]
base_image = "nvcr.io/nvidia/pytorch:25.10-py3"
cuda_archs = "121-real"
options = {{ BUILD_WHEEL_OPTS = "--use_ccache" }}

[[fixes]]
commit = "{OTHER}"
pr = 8803
title = "Fix the AllReduce wrapper cache"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tensorrt-llm.lock.toml"
    path.write_text(text)
    return path


def test_a_good_lock_loads(tmp_path):
    lockfile = locks.load(write(tmp_path, GOOD))
    assert lockfile.lock.source.commit == SHA
    assert lockfile.lock.source.submodules[0].path == "3rdparty/cutlass"
    assert lockfile.lock.build.kind == "source" and lockfile.lock.build.jobs == 0
    assert lockfile.lock.fixes[0].pr == 8803


def test_the_shipped_lock_is_valid_and_says_what_is_still_to_resolve():
    lockfile = locks.load(ROOT / locks.DEFAULT_PATH)
    assert lockfile.lock.build.cuda_archs == "121-real"  # GB10
    assert all(fix.pr or fix.commit for fix in lockfile.lock.fixes)
    if lockfile.lock.source.commit is None:  # shipped unresolved: no SHA was read from upstream here
        with pytest.raises(locks.LockError, match="invoke source.update"):
            lockfile.require_resolved()


def test_a_fix_given_by_pr_number_only_is_accepted_and_written_back(tmp_path):
    given = f'[[fixes]]\ncommit = "{OTHER}"\npr = 8803\ntitle = "Fix the AllReduce wrapper cache"'
    text = GOOD.replace(given, "[[fixes]]\npr = 7937")
    lock = locks.load(write(tmp_path, text)).lock
    assert lock.fixes[0].commit is None and lock.fixes[0].pr == 7937
    assert "[[fixes]]\npr = 7937\n" in locks.dumps(lock)


@pytest.mark.parametrize("old, new, line, words", [
    (f'commit = "{SHA}"', 'commit = "abc123"', 4, ["source.commit", "40-character"]),
    ('cuda_archs = "121-real"', 'cuda_archs = "121-virtual"', 13, ["-virtual is refused"]),
    ('cuda_archs = "121-real"', 'cuda_archs = "sm_121"', 13, ["expected NN"]),
    ('options = { BUILD_WHEEL_OPTS = "--use_ccache" }', 'options = { CUDA_ARCHS = "120-real" }', 14,
     ["CUDA_ARCHS is set by trtllm-deploy"]),
    ('ref = "main"', 'reff = "main"', 3, ["unknown key", "'ref'"]),
    ("pr = 8803", "pr = 0", 18, ["fixes[0].pr", "greater than or equal to 1"]),
    ('[build]', '[build]\nkind = "release"', 12, ["needs [release] image"]),
], ids=["short-sha", "virtual-arch", "bad-arch", "reserved-option", "typo", "bad-pr", "release-no-image"])
def test_a_bad_lock_names_the_line_and_the_fix(tmp_path, old, new, line, words):
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(locks.LockError) as caught:
        locks.load(path)
    message = str(caught.value)
    if line:
        assert f"{path}:{line}:" in message
    assert "what to do:" in message
    for word in words:
        assert word in message


def test_a_bad_lock_on_the_command_line_exits_2_before_any_host(tmp_path):
    path = write(tmp_path, GOOD.replace('cuda_archs = "121-real"', 'cuda_archs = "121-virtual"'))
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[[nodes]]\nname = "far"\naddress = "192.0.2.1"\n')  # never contacted
    done = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "source",
                           "--lock", str(path), "--hosts", str(hosts)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "-virtual is refused" in done.stderr and "Traceback" not in done.stderr


def test_writing_a_lock_and_reading_it_back_gives_the_same_lock(tmp_path):
    lock = locks.load(write(tmp_path, GOOD)).lock
    again = tmp_path / "again.toml"
    locks.write(again, lock)
    assert locks.load(again).lock == lock
    locks.write(again, lock)
    assert again.read_text() == locks.dumps(lock)  # stable: a rewrite changes no byte


COMMENTED = GOOD.replace('ref = "main"', 'ref = "main"  # the branch we follow').replace(
    "[build]", "# Built on the Spark itself.\n[build]").replace(
    "[[fixes]]", "[[fixes]]\n# the hang we saw in March") + "\n# Nothing below this line.\n"


@pytest.mark.parametrize("change, written", [
    (lambda lock: lock, []),
    (lambda lock: lock.model_copy(update={"source": lock.source.model_copy(update={"commit": OTHER})}),
     [f'commit = "{OTHER}"']),
    (lambda lock: lock.model_copy(update={"build": lock.build.model_copy(update={"jobs": 8})}),
     ["jobs = 8"]),
    (lambda lock: lock.model_copy(update={"fixes": [*lock.fixes, locks.Fix(pr=7937)]}),
     ["[[fixes]]\npr = 7937"]),
    (lambda lock: lock.model_copy(update={"source": lock.source.model_copy(update={"version": None})}),
     []),
    (lambda lock: lock.model_copy(update={"release": locks.Release(image='with "quotes" \\ and\nlines')}),
     ['[release]\nimage = "with \\"quotes\\" \\\\ and\\nlines"']),
], ids=["unchanged", "new-commit", "new-jobs", "one-more-fix", "version-dropped", "escaped"])
def test_a_rewritten_lock_keeps_the_users_comments(tmp_path, change, written):
    path = write(tmp_path, COMMENTED)
    lock = change(locks.load(path).lock)
    locks.write(path, lock)
    text = path.read_text()
    assert locks.load(path).lock == lock
    for comment in ("# the branch we follow", "# Built on the Spark itself.", "# the hang we saw in March",
                    "# Nothing below this line."):
        assert comment in text
    for line in written:
        assert line in text
    locks.write(path, lock)
    assert path.read_text() == text  # stable: a rewrite with nothing changed changes no byte
    assert sorted(path.name for path in tmp_path.iterdir()) == [path.name]  # no temporary left


def test_the_shipped_lock_rewritten_unchanged_is_the_same_file(tmp_path):
    shipped = ROOT / locks.DEFAULT_PATH
    path = tmp_path / "lock.toml"
    path.write_text(shipped.read_text())
    locks.write(path, locks.load(path).lock)
    assert path.read_text() == shipped.read_text()


@pytest.mark.parametrize("change, differs", [
    (lambda t: t.replace(f'commit = "{SHA}"', f'commit = "{OTHER}"', 1), True),
    (lambda t: t.replace('"121-real"', '"120-real"'), True),
    (lambda t: t.replace('--use_ccache', '--no-ccache'), True),
    (lambda t: t.replace("pytorch:25.10-py3", "pytorch:25.11-py3"), True),
    (lambda t: t.replace('commit = "' + OTHER + '"\n\n[build]', 'commit = "' + SHA + '"\n\n[build]'),
     True),  # a submodule moved
    (lambda t: t.replace('ref = "main"', 'ref = "v1.3.0rc1"'), False),
    (lambda t: t.replace('version = "1.3.0rc1"', 'version = "1.3.0rc1"\ndate = "2026-11-01"'), False),
    (lambda t: t.replace("[build]", "[build]\njobs = 4"), False),
    (lambda t: t.replace("Fix the AllReduce", "Fix the all-reduce"), False),
], ids=["commit", "cuda-archs", "options", "base", "submodule", "ref-name", "date", "jobs", "fix-title"])
def test_the_lock_hash_follows_what_decides_the_image(tmp_path, change, differs):
    first = locks.load(write(tmp_path, GOOD)).hash
    second = locks.load(write(tmp_path, change(GOOD))).hash
    assert (first != second) is differs


@pytest.mark.parametrize("capabilities, archs", [
    (["12.1"], "121-real"), (["12.1", "12.1"], "121-real"), (["9.0", "12.1"], "90-real;121-real"),
])
def test_cuda_archs_come_from_compute_capability(capabilities, archs):
    assert cuda.archs_for(capabilities) == archs


@pytest.mark.parametrize("archs, capability, ok, words", [
    ("121-real", "12.1", True, "exactly"),
    ("120-real", "12.1", True, "without its architecture-specific kernels"),
    ("90-real;100-real;120-real", "12.1", True, "same major"),  # upstream's arm64 default
    ("120f", "12.1", True, "family"),
    ("121a", "12.1", True, "exactly"),
    ("120a", "12.1", False, "nothing"),
    ("90-real;100-real", "12.1", False, "nothing"),
    ("90", "12.1", True, "PTX"),
    ("121-real", "12.0", False, "nothing"),
    ("native", "12.1", True, "native"),
])
def test_cuda_archs_coverage(archs, capability, ok, words):
    covered, how = cuda.covers(archs, capability)
    assert covered is ok and words in how


@pytest.mark.parametrize("gb, cpus, jobs", [
    (120, 20, 14),  # a Spark with most of its 128 GB free: memory, not cores, decides
    (20, 20, 1),
    (4, 8, 1),      # never zero
    (512, 16, 16),  # a big x86 builder: cores decide
])
def test_compile_jobs_are_sized_from_memory(gb, cpus, jobs):
    count, why = make.jobs_for(gb * make.GB, cpus)
    assert count == jobs
    assert f"{cpus} cores" in why and "GB per compile job" in why


def test_make_argv_carries_the_lock_and_labels_quoted_for_the_recipe_shell(tmp_path):
    lockfile = locks.load(write(tmp_path, GOOD))
    labels = plan.labels(lockfile, "121-real")
    argv = make.make_argv(lockfile, "/b/TensorRT-LLM", plan.image_ref(lockfile), "121-real", 6,
                            labels)
    assert argv[:4] == ["make", "-C", "/b/TensorRT-LLM/docker", "release_build"]
    assert "CUDA_ARCHS=121-real" in argv
    assert "BUILD_WHEEL_OPTS=--use_ccache --job_count 6" in argv
    docker_opts = next(a for a in argv if a.startswith("DOCKER_BUILD_OPTS=")).split("=", 1)[1]
    words = shlex.split(docker_opts)  # what the Makefile's recipe shell will see
    assert words[:2] == ["--pull", "--load"]  # the Makefile's own default, kept
    words = words[2:]
    pairs = dict(words[i + 1].split("=", 1) for i in range(0, len(words), 2))
    assert pairs == labels
    assert labels["org.opencontainers.image.revision"] == SHA
    assert labels[plan.LABEL_LOCK] == lockfile.hash


@pytest.mark.parametrize("ccache, expected", [(True, "--benchmarks --job_count 4 --use_ccache"),
                                              (False, "--benchmarks --job_count 4")])
def test_ccache_is_asked_for_only_where_the_tree_sets_it_up(tmp_path, ccache, expected):
    lockfile = locks.load(write(tmp_path, GOOD.replace("--use_ccache", "--benchmarks")))
    argv = make.make_argv(lockfile, "/t", plan.image_ref(lockfile), "121-real", 4, {}, ccache)
    assert f"BUILD_WHEEL_OPTS={expected}" in argv


REPORT = {"environment": {"platform_machine": "aarch64", "python_full_version": "3.12.3"},
          "install": [
              {"metadata": {"name": "tensorrt-llm", "version": "1.2.1"}, "is_direct": False,
               "download_info": {"url": "https://files.example/tensorrt_llm-1.2.1.whl",
                                 "archive_info": {"hashes": {"sha256": "a" * 64}}}},
              {"metadata": {"name": "Aiohttp", "version": "3.9.0"}, "is_direct": False,
               "download_info": {"url": "file:///tmp/trtllm-deploy-wheels/aiohttp-3.9.0.whl",
                                 "archive_info": {}}}]}


def test_wheel_requirements_pin_every_package_pip_would_install_by_hash():
    text = wheel.requirements(REPORT, "tensorrt-llm==1.2.1 on base",
                              lambda url: "b" * 64 if url.endswith("aiohttp-3.9.0.whl") else None)
    assert "aarch64, Python 3.12.3" in text
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert body == ["Aiohttp==3.9.0 \\", f"    --hash=sha256:{'b' * 64}",
                    "tensorrt-llm==1.2.1 \\", f"    --hash=sha256:{'a' * 64}"]


def test_a_package_without_a_hash_to_pin_is_refused():
    with pytest.raises(DeployError, match="aiohttp-3.9.0.whl without a sha256"):
        wheel.requirements(REPORT, "x")


def test_the_quantize_table_survives_a_rewrite_and_leaves_the_image_hash_alone(tmp_path):
    shipped = locks.load(Path(__file__).resolve().parents[1] / "requirements" / "tensorrt-llm.lock.toml")
    assert shipped.lock.quantize == locks.Quantize() and "[quantize]" not in locks.dumps(shipped.lock)
    changed = shipped.lock.model_copy(update={"quantize": locks.Quantize(ref="0.45.0", calib_size=64,
                                                                          dataset="cnn_dailymail")})
    path = tmp_path / "lock.toml"
    locks.write(path, changed)
    again = locks.load(path)
    assert again.lock.quantize == changed.quantize
    assert locks.dumps(again.lock) == path.read_text()
    # Quantizing changes artifacts, not images: the image's lock hash stays.
    assert again.hash == shipped.hash
    path.write_text(path.read_text().replace("calib_size = 64", "calib_size = 0"))
    with pytest.raises(locks.LockError, match="quantize.calib_size"):
        locks.load(path)


# --- the offline check (nox -s lock -- --check) --------------------------------------------------

def hashed(text: str, tmp_path: Path) -> str:
    """``text`` with the lock_hash of its contents recorded at the top, as source.update writes it."""
    computed = locks.load(write(tmp_path, text)).hash
    return f'lock_hash = "{computed}"\n\n' + text


def test_a_consistent_lock_passes_the_offline_check(tmp_path):
    path = write(tmp_path, hashed(GOOD, tmp_path))
    assert lockcheck.check_offline(path) == []
    assert locks.load(path).lock.lock_hash == locks.load(path).hash


def test_the_shipped_lock_passes_the_offline_check():
    shipped = ROOT / locks.DEFAULT_PATH
    assert lockcheck.check_offline(shipped) == []
    lock = locks.load(shipped).lock
    several = {fix.pr for fix in lock.fixes if fix.needed_for == "several"}
    assert several == {12902, 15559}  # issue #12715's multi-node fixes (docs/SOURCES.md)
    assert {fix.pr for fix in lock.fixes if fix.needed_for == "any"} == {7937}


@pytest.mark.parametrize("edit, line, words", [
    (lambda t: t.replace('cuda_archs = "121-real"', 'cuda_archs = "120-real"'), 1,
     ["lock_hash", "not the hash of the lock's contents"]),
    (lambda t: t.replace(f'commit = "{SHA}"', f'commit = "{OTHER}"', 1), 1, ["lock_hash", "edited"]),
    (lambda t: t.split("\n", 2)[2], None, ["no lock_hash recorded"]),
    (lambda t: t.replace(f'commit = "{OTHER}"\npr = 8803', "pr = 8803"), 18,
     ["fixes[0]", "no commit SHA", "not checked against the pin"]),
    (lambda t: t.replace("pr = 8803", 'pr = 8803\nmissing = "not in the history"'), 21,
     ["needed by every deployment", "missing"]),
    (lambda t: t.split("\n", 2)[2].replace(f'commit = "{SHA}"\n', "", 1), 4,
     ["source.version", "no commit is pinned", "no lock_hash recorded"]),
    (lambda t: t.replace("pytorch:25.10-py3", "pytorch:25.10-py3@sha256:abc"), 1, ["lock_hash"]),
    (lambda t: t.replace('lock_hash = "', 'lock_hash = "x'), 1, ["64 lowercase hex"]),
    (lambda t: t.replace("[build]", "[build\n"), 13, ["not valid TOML"]),
], ids=["edited-archs", "edited-commit", "no-hash", "fix-unresolved", "any-fix-missing", "version-unpinned",
        "bad-digest", "bad-hash", "not-toml"])
def test_a_hand_broken_or_stale_lock_fails_the_offline_check_with_its_line(tmp_path, edit, line, words):
    path = write(tmp_path, edit(hashed(GOOD, tmp_path)))
    problems = lockcheck.check_offline(path)
    assert problems
    report = lockcheck.check_report(path)
    for word in words:
        assert word in report
    if line:
        assert f"{path}:{line}:" in report
    assert "what to do:" in report


def test_a_malformed_digest_is_named(tmp_path):
    text = GOOD.replace("pytorch:25.10-py3", "pytorch:25.10-py3@sha256:abc")
    report = lockcheck.check_report(write(tmp_path, hashed(text, tmp_path)))
    assert "build.base_image" in report and "64 lowercase hex" in report


def test_the_offline_check_as_nox_runs_it_exits_1_on_a_broken_lock(tmp_path):
    good = write(tmp_path, hashed(GOOD, tmp_path))
    command = [sys.executable, "-m", "trtllm_deploy.source.lockcheck", "--check"]
    done = subprocess.run([*command, str(good)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    good.write_text(good.read_text().replace('"121-real"', '"120-real"'))
    done = subprocess.run([*command, str(good)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1 and f"{good}:1: lock_hash:" in done.stderr
    assert "Traceback" not in done.stderr


UNICODE = {
    "emoji": "🐛 [None][fix] Skip NCCL window registration on SM121 (#15559)",
    "beyond-bmp": "𝄞 𝕋𝕖𝕟𝕤𝕠𝕣 \U0010FFFD",
    "combining": "e\u0301 n\u0303 (decomposed accents)",
    "right-to-left": "שלום עולם — مرحبا",
    "cjk": "修复多节点挂起问题",
    "control": "tab\there, escape \x1b, delete \x7f, nul \x00",
    "c1-and-separators": "next line \x85, line separator \u2028, paragraph \u2029, bom \ufeff",
    "quotes": "she said \"it's fixed\" \\ '''twice''' \"\"\"",
}


@pytest.mark.parametrize("text", UNICODE.values(), ids=UNICODE.keys())
def test_any_unicode_in_a_fix_round_trips_through_tomllib(tmp_path, text):
    """The lock was once written with JSON's escapes (json.dumps), which spell a character beyond
    the Basic Multilingual Plane as a UTF-16 surrogate pair, "\\ud83d\\udc1b", and TOML allows only
    scalar values in escapes: tomllib refused the lock ("Escaped character is not a Unicode scalar
    value"). Written with tomlkit (tomlsource.rewrite), the character is written as itself."""
    lock = locks.load(write(tmp_path, GOOD)).lock
    missing = f'reverted by {OTHER[:12]} "Revert \\"{text}\\""'
    changed = lock.model_copy(update={"fixes": [lock.fixes[0].model_copy(update={
        "title": text, "needed_for": "several", "missing": missing})]})
    path = write(tmp_path, COMMENTED)
    for previous in (None, path.read_text(encoding="utf-8")):   # a new file, and written into one
        written = locks.dumps(changed, previous)
        back = tomllib.loads(written)["fixes"][0]
        assert (back["title"], back["missing"]) == (changed.fixes[0].title, changed.fixes[0].missing)
    locks.write(path, changed)
    assert locks.load(path).lock == changed
    assert "# the hang we saw in March" in path.read_text(encoding="utf-8")
