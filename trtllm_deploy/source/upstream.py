"""Upstream TensorRT-LLM against the lock: its newest releases and main, the state of every tracked
issue and pull request, and which release holds the required fixes — from GitHub's REST API.

Every answer is kept on disk with the time it was fetched, sent back as ``If-None-Match`` (an
unchanged answer costs no rate limit), and used alone when offline or rate limited, its age shown.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from trtllm_deploy import atomic, secrets
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.source import lock as locks
from trtllm_deploy.tomlsource import Problem, TomlFileError, problems_from, read

API = "https://api.github.com"
TRACK_FILE = Path("requirements/upstream.toml")
API_VERSION = "2022-11-28"
TIMEOUT_S = 10.0
# Releases are listed newest first, a page at a time; TensorRT-LLM publishes dozens of release
# candidates between stable releases, so the newest stable one may be several pages down.
RELEASES_PER_PAGE = 100
MAX_RELEASE_PAGES = 10
_NEXT = re.compile(r'<([^>]+)>\s*;[^,]*\brel="?next"?')
_GITHUB = re.compile(r"github\.com[/:]([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+?)(?:\.git)?/?$")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "trtllm-deploy" / "github"


# --- what to watch beside the lock's fixes ----------------------------------------------------

class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Track(_Table):
    number: Annotated[StrictInt, Field(ge=1)]
    note: StrictStr = ""


class _TrackFile(_Table):
    track: list[Track] = []


class TrackFileError(TomlFileError):
    """The list of tracked issues is wrong; every problem with its line."""


def load_tracked(path: Path | str | None) -> list[Track]:
    """The ``[[track]]`` entries of ``path``; the default file may be absent (nothing tracked)."""
    source = Path(path) if path else TRACK_FILE
    if path is None and not source.is_file():
        return []
    text, data = read(source, TrackFileError, "create it with [[track]] number = N entries, or fix --track")
    try:
        return list(_TrackFile.model_validate(data).track)
    except ValidationError as exc:
        raise TrackFileError(source, text, problems_from(
            exc, _TrackFile, (), {"number": "number = 8474", "note": 'note = "why it matters"'})) from None


def repository(lockfile: locks.LockFile) -> str:
    """``owner/name`` of the lock's repository, which must be on GitHub."""
    url = lockfile.lock.source.repository
    match = _GITHUB.search(url)
    if not match:
        raise TomlFileError(lockfile.path, lockfile.path.read_text(), [Problem(
            ("source", "repository"), f"{url!r} is not a GitHub repository; upstream reads GitHub's API",
            'use repository = "https://github.com/NVIDIA/TensorRT-LLM.git"')])
    return f"{match.group(1)}/{match.group(2)}"


# --- the API, cached ---------------------------------------------------------------------------

class NotCached(Exception):
    """Offline, and this answer was never fetched."""


@dataclass
class GitHub:
    """GET on GitHub's REST API with an on-disk cache; ``offline`` uses the cache only.

    After the first failure to connect it stays offline for the rest of the run (one timeout, not
    one per request), and says why in ``offline_reason``.
    """

    base_url: str = API
    token: str | None = None
    cache: Path = field(default_factory=cache_dir)
    offline: bool = False
    offline_reason: str = ""
    timeout: float = TIMEOUT_S
    oldest: float | None = None       # fetch time of the oldest answer used
    requests: int = 0
    from_cache: int = 0

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if self.token:
            secrets.register(self.token)

    def _file(self, path: str) -> Path:
        return self.cache / (hashlib.sha256(f"{self.base_url}{path}".encode()).hexdigest()[:32] + ".json")

    def _cached(self, path: str) -> dict | None:
        try:
            return json.loads(self._file(path).read_text())
        except (OSError, ValueError):
            return None

    def _use(self, entry: dict) -> Any:
        self.from_cache += 1
        self.oldest = min(self.oldest or entry["fetched_at"], entry["fetched_at"])
        return entry["body"]

    def _store(self, path: str, etag: str | None, body: Any, link: str | None = None) -> None:
        self.cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        entry = {"path": path, "base_url": self.base_url, "fetched_at": time.time(), "etag": etag,
                 "body": body, "link": link}
        atomic.write_text(self._file(path), json.dumps(entry))

    def get(self, path: str) -> Any:
        """The JSON answer for ``path`` (e.g. ``/repos/o/r/releases``); None for a 404.

        Raises :class:`NotCached` when offline with nothing cached, :class:`CheckFailed` when GitHub
        refuses the token or the rate limit is spent with nothing cached.
        """
        return self.page(path)[0]

    def page(self, path: str) -> tuple[Any, str | None]:
        """:meth:`get`, and the path of the next page where the answer's ``Link`` header names one
        (kept in the cache with the answer, so a 304 or an offline run pages the same way). A next
        page on another host than ``base_url`` is not followed: the token is for this API only."""
        body, link = self._answer(path)
        match = _NEXT.search(link or "")
        target = match.group(1) if match else ""
        return body, target[len(self.base_url):] if target.startswith(self.base_url + "/") else None

    def _answer(self, path: str) -> tuple[Any, str | None]:
        cached = self._cached(path)
        if self.offline:
            if cached is None:
                raise NotCached(path)
            return self._use(cached), cached.get("link")
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": API_VERSION,
                   "User-Agent": "trtllm-deploy"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if cached and cached.get("etag"):
            headers["If-None-Match"] = cached["etag"]
        request = urllib.request.Request(self.base_url + path, headers=headers)
        self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = json.loads(response.read())
                link = response.headers.get("Link")
                self._store(path, response.headers.get("ETag"), body, link)
                self.oldest = min(self.oldest or time.time(), time.time())
                return body, link
        except urllib.error.HTTPError as exc:
            return self._refused(path, exc, cached)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            self.offline, self.offline_reason = True, f"cannot reach {self.base_url}: {reason}"
            if cached is None:
                raise NotCached(path) from None
            return self._use(cached), cached.get("link")

    def _refused(self, path: str, exc: urllib.error.HTTPError, cached: dict | None) -> tuple[Any, str | None]:
        if exc.code == 304 and cached is not None:
            # Unchanged since it was fetched: as fresh as a new answer, and free of rate limit.
            self._store(path, cached.get("etag"), cached["body"], cached.get("link"))
            self.oldest = min(self.oldest or time.time(), time.time())
            return cached["body"], cached.get("link")
        if exc.code == 404:
            return None, None
        if exc.code == 401:
            raise CheckFailed("GitHub refused the token in GITHUB_TOKEN (401 Bad credentials)\n"
                              "  what to do: renew the token, or unset GITHUB_TOKEN to ask without one")
        if exc.code in (403, 429) and (exc.headers.get("X-RateLimit-Remaining") == "0" or exc.code == 429):
            reset = exc.headers.get("X-RateLimit-Reset")
            until = (time.strftime("%H:%M", time.localtime(int(reset))) if reset and reset.isdigit()
                     else "later")
            self.offline, self.offline_reason = True, f"GitHub's rate limit is spent until {until}"
            if cached is not None:
                return self._use(cached), cached.get("link")
            raise CheckFailed(f"{self.offline_reason}, and {path} is not cached\n"
                              "  what to do: set GITHUB_TOKEN (5,000 requests an hour instead of 60),"
                              " or wait") from None
        raise CheckFailed(f"GitHub answered {exc.code} {exc.reason} for {path}\n"
                          "  what to do: try again later; --offline shows what is cached") from None


# --- the report ---------------------------------------------------------------------------------

@dataclass
class Item:
    """A tracked issue or pull request; a required fix when the lock lists it."""

    number: int
    kind: str = "unknown"              # pr | issue | unknown
    title: str = ""
    state: str = "unknown"             # open | closed | merged | not found | unknown (not cached)
    required: bool = False
    note: str = ""
    merge_commit: str | None = None
    url: str = ""
    in_pin: bool | None = None         # merged into the pinned commit's history


@dataclass
class Release:
    tag: str
    prerelease: bool
    published_at: str
    url: str
    newer_than_pin: bool | None
    contains: dict[int, bool | None] = field(default_factory=dict)   # required fix -> in this release

    @property
    def has_every_fix(self) -> bool:
        return bool(self.contains) and all(self.contains.values())


@dataclass
class Report:
    repository: str
    lock: str
    pinned_commit: str | None
    pinned_version: str | None
    release_image: str | None
    wheel_version: str | None
    compared_with: str | None = None   # the pinned version releases are compared with, and where from
    main_commit: str | None = None
    main_date: str | None = None
    main_subject: str | None = None
    main_ahead_of_pin: int | None = None
    releases: list[Release] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    offline: bool = False
    offline_reason: str = ""
    fetched_at: float | None = None    # the oldest answer used
    requests: int = 0

    @property
    def age_s(self) -> float | None:
        return None if self.fetched_at is None else max(time.time() - self.fetched_at, 0.0)

    def as_json(self) -> dict:
        data = asdict(self)
        data["age_s"] = self.age_s
        for release, original in zip(data["releases"], self.releases, strict=True):
            release["contains"] = {str(k): v for k, v in original.contains.items()}
            release["has_every_fix"] = original.has_every_fix
        return data


def _version(text: str | None) -> Version | None:
    try:
        return Version(text.removeprefix("v")) if text else None
    except InvalidVersion:
        return None


def _contained(api: GitHub, repo: str, base: str, commit: str) -> bool | None:
    """Whether ``commit`` is in ``base``'s history: compare base...commit is behind or identical."""
    try:
        answer = api.get(f"/repos/{repo}/compare/{base}...{commit}")
    except NotCached:
        return None
    return None if answer is None else answer.get("status") in ("behind", "identical")


def _item(api: GitHub, repo: str, number: int, required: bool, note: str) -> Item:
    item = Item(number=number, required=required, note=note)
    try:
        issue = api.get(f"/repos/{repo}/issues/{number}")
        if issue is None:
            item.state = "not found"
            return item
        item.title, item.url, item.state = issue.get("title", ""), issue.get("html_url", ""), issue["state"]
        item.kind = "pr" if "pull_request" in issue else "issue"
        if item.kind == "issue" and issue.get("state_reason") == "not_planned":
            item.state = "closed (not planned)"
        if item.kind == "pr":
            pull = api.get(f"/repos/{repo}/pulls/{number}")
            if pull and pull.get("merged"):
                item.state, item.merge_commit = "merged", pull.get("merge_commit_sha")
    except NotCached:
        item.state = "unknown (not cached)"
    return item


def _releases(api: GitHub, repo: str) -> list[dict]:
    """The releases, newest first, page after page until one is stable (or the pages end, or
    ``MAX_RELEASE_PAGES`` were read). A later page that is not cached offline ends the list there."""
    path: str | None = f"/repos/{repo}/releases?per_page={RELEASES_PER_PAGE}"
    listed: list[dict] = []
    for number in range(MAX_RELEASE_PAGES):
        try:
            body, path = api.page(path)
        except NotCached:
            if number == 0:
                raise
            break
        listed += body or []
        if path is None or any(not r.get("draft") and not r.get("prerelease") for r in listed):
            break
    return listed


def check(lockfile: locks.LockFile, tracked: list[Track], api: GitHub) -> Report:
    """Everything ``invoke upstream`` shows, from the API (or its cache)."""
    repo, lock = repository(lockfile), lockfile.lock
    release_tag = lock.release.image.rsplit(":", 1)[-1] if lock.release.image else None
    report = Report(repository=repo, lock=str(lockfile.path), pinned_commit=lock.source.commit,
                    pinned_version=lock.source.version, release_image=lock.release.image,
                    wheel_version=lock.wheel.version)
    try:
        listed = _releases(api, repo)
    except NotCached:
        raise CheckFailed(f"{api.offline_reason or 'offline'}, and nothing is cached yet\n"
                          "  what to do: run `invoke upstream` once with network access") from None
    pins = [(lock.source.version, "[source] version"), (release_tag, "[release] image"),
            (lock.wheel.version, "[wheel] version")]
    pin, said = next(((_version(text), f"{text} ({where})") for text, where in pins if _version(text)),
                     (None, None))
    report.compared_with = said
    published = [r for r in listed if not r.get("draft")]
    newest = published[:1] + [r for r in published if not r.get("prerelease")][:1]
    for entry in {r["tag_name"]: r for r in newest}.values():
        version = _version(entry["tag_name"])
        report.releases.append(Release(entry["tag_name"], bool(entry.get("prerelease")),
                                       entry.get("published_at") or "", entry.get("html_url", ""),
                                       None if pin is None or version is None else version > pin))
    try:
        tip = api.get(f"/repos/{repo}/commits/main")
    except NotCached:
        tip = None
    if tip:
        report.main_commit, report.main_date = tip["sha"], tip["commit"]["committer"]["date"]
        report.main_subject = tip["commit"]["message"].splitlines()[0]
        if lock.source.commit:
            try:
                answer = api.get(f"/repos/{repo}/compare/{lock.source.commit}...{tip['sha']}")
                report.main_ahead_of_pin = answer.get("ahead_by") if answer else None
            except NotCached:
                pass

    fixes = [fix.pr for fix in lock.fixes if fix.pr]
    for number in dict.fromkeys(fixes + [t.number for t in tracked]):
        note = next((t.note for t in tracked if t.number == number), "")
        item = _item(api, repo, number, number in fixes, note)
        if item.merge_commit and lock.source.commit:
            item.in_pin = _contained(api, repo, lock.source.commit, item.merge_commit)
        report.items.append(item)
    for release in report.releases:
        for item in report.items:
            if item.required:
                release.contains[item.number] = (_contained(api, repo, release.tag, item.merge_commit)
                                                 if item.merge_commit else
                                                 None if item.state.startswith("unknown") else False)
    report.offline, report.offline_reason = api.offline, api.offline_reason
    report.fetched_at, report.requests = api.oldest, api.requests
    return report


def age(seconds: float | None) -> str:
    """How old a cached answer is, in words: 'just now', '5 min', '3 h', '2 days'."""
    if seconds is None:
        return "never fetched"
    if seconds < 60:
        return "just now"
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


__all__ = ["GitHub", "Report", "Item", "Release", "Track", "check", "load_tracked", "repository", "age"]
