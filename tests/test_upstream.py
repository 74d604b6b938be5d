"""invoke upstream against a real HTTP server on 127.0.0.1 serving recorded GitHub API answers
(tests/data/github/, see its SOURCES.md): releases, main, issues, pulls, compare; ETags, the cache,
offline use, and the token."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from invoke import Context
from invoke.exceptions import Exit

from trtllm_deploy import console
from trtllm_deploy.cli import upstream as cli
from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.source import lock as locks
from trtllm_deploy.source import upstream

DATA = Path(__file__).parent / "data" / "github"
PIN = "33469d3faaaa5d6833f75be819e4820ed8b6e120"
MAIN = "bcb9f9b20179329552f9b756c6b7967b6126ef4b"
FIX_7937 = "12e4108ccd05abf045e39be597dceeeacb41e590"
TOKEN = "ghp_" + "T3stT0kenNeverPrinted0000000000000000"
REFUSED = "ghp_" + "RefusedT0ken111111111111111111111111"
# The releases by name, and by the repository's id as GitHub's Link header names the next pages.
RELEASE_PATHS = ("/repos/NVIDIA/TensorRT-LLM/releases", "/repositories/249136627/releases")


class FakeGitHub(ThreadingHTTPServer):
    """Answers GET /repos/... from the recorded files, as GitHub does: ETag, 304, 404, 401, 403."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, Message]] = []
        self.answers: list[int] = []
        self.rate_limited = False
        # When set, the releases are served a page at a time from these lists (see _release_page).
        self.release_pages: list[list[dict]] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeGitHub

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.server.answers.append(code)
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers))   # an HTTPMessage: names case-insensitive
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        if self.headers.get("Authorization") == f"Bearer {REFUSED}":
            return self._send(401, json.dumps({
                "message": "Bad credentials", "documentation_url": "https://docs.github.com/rest",
                "status": "401"}).encode(), json_type)
        if self.server.rate_limited:
            return self._send(403, json.dumps({
                "message": "API rate limit exceeded for 127.0.0.1.",
                "documentation_url": "https://docs.github.com/rest/overview/resources-in-the-rest-api"
                                     "#rate-limiting"}).encode(),
                json_type | {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "0",
                             "X-RateLimit-Reset": str(int(time.time()) + 1800)})
        if self.server.release_pages is not None and urlsplit(self.path).path in RELEASE_PATHS:
            return self._release_page()
        path = DATA / (urlsplit(self.path).path.lstrip("/") + ".json")
        if not path.is_file():
            return self._send(404, json.dumps({
                "message": "Not Found", "documentation_url": "https://docs.github.com/rest",
                "status": "404"}).encode(), json_type)
        self._answer(path.read_bytes())

    def _answer(self, body: bytes, headers: dict | None = None) -> None:
        etag = f'W/"{hashlib.sha256(body).hexdigest()}"'
        if self.headers.get("If-None-Match") == etag:
            return self._send(304, b"", {"ETag": etag} | (headers or {}))
        self._send(200, body, {"Content-Type": "application/json; charset=utf-8", "ETag": etag,
                               "X-RateLimit-Remaining": "59"} | (headers or {}))

    def _release_page(self) -> None:
        """One page of releases, with the ``Link`` header GitHub sends (RFC 8288: the next and last
        pages as absolute URLs by the repository's numeric id, ``rel="next"``/``rel="last"``)."""
        pages = self.server.release_pages
        query = dict(pair.partition("=")[::2] for pair in urlsplit(self.path).query.split("&") if pair)
        number = int(query.get("page", "1"))
        per_page = query.get("per_page", "30")
        link = f"{self.server.url}{RELEASE_PATHS[1]}?per_page={per_page}&page={{}}"
        links = []
        if number < len(pages):
            links.append(f'<{link.format(number + 1)}>; rel="next"')
        links.append(f'<{link.format(len(pages))}>; rel="last"')
        if number > 1:
            links = [f'<{link.format(number - 1)}>; rel="prev"', f'<{link.format(1)}>; rel="first"', *links]
        self._answer(json.dumps(pages[number - 1]).encode(), {"Link": ", ".join(links)})


@pytest.fixture
def github():
    server = FakeGitHub()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def lockfile(tmp_path) -> locks.LockFile:
    path = tmp_path / "tensorrt-llm.lock.toml"
    path.write_text(f"""\
[source]
repository = "https://github.com/NVIDIA/TensorRT-LLM.git"
commit = "{PIN}"
version = "1.2.0rc1"

[build]
kind = "source"

[[fixes]]
pr = 7937

[[fixes]]
pr = 8944
""")
    return locks.load(path)


@pytest.fixture
def tracked(tmp_path) -> list[upstream.Track]:
    path = tmp_path / "upstream.toml"
    path.write_text("[[track]]\nnumber = 8474\nnote = \"open bug\"\n\n[[track]]\nnumber = 2953\n\n"
                    "[[track]]\nnumber = 9054\n\n[[track]]\nnumber = 9060\n")
    return upstream.load_tracked(path)


def _api(github: FakeGitHub, tmp_path: Path, **kwargs) -> upstream.GitHub:
    return upstream.GitHub(base_url=github.url, cache=tmp_path / "cache", **kwargs)


def test_the_report_from_the_recorded_api(github, tmp_path, lockfile, tracked):
    report = upstream.check(lockfile, tracked, _api(github, tmp_path))
    assert not report.offline and report.age_s < 60
    assert report.main_commit == MAIN and report.main_ahead_of_pin == 1234
    assert report.main_subject == "[None][chore] Bump version to 1.4.0rc0 (#16801)"
    newest, stable = report.releases
    assert (newest.tag, newest.prerelease, newest.newer_than_pin) == ("v1.3.0rc1", True, True)
    assert (stable.tag, stable.prerelease, stable.newer_than_pin) == ("v1.2.0", False, True)
    assert newest.contains == {7937: True, 8944: True} and newest.has_every_fix
    assert stable.contains == {7937: True, 8944: False} and not stable.has_every_fix
    states = {item.number: (item.kind, item.state, item.required, item.in_pin) for item in report.items}
    assert states == {
        7937: ("pr", "merged", True, True),
        8944: ("pr", "merged", True, False),       # merged after the pin: not in it
        8474: ("issue", "open", False, None),
        2953: ("issue", "closed", False, None),
        9054: ("pr", "open", False, None),
        9060: ("pr", "closed", False, None),       # closed without merging
    }
    assert report.items[0].merge_commit == FIX_7937
    paths = [path for path, _ in github.seen]
    assert f"/repos/NVIDIA/TensorRT-LLM/compare/v1.2.0...{FIX_7937}" in paths
    assert all(headers["X-GitHub-Api-Version"] == "2022-11-28" for _, headers in github.seen)
    assert all("Authorization" not in headers for _, headers in github.seen)


def test_a_second_run_asks_with_etags_and_costs_no_rate_limit(github, tmp_path, lockfile, tracked):
    first = upstream.check(lockfile, tracked, _api(github, tmp_path))
    count = len(github.seen)
    second = upstream.check(lockfile, tracked, _api(github, tmp_path))
    again = github.seen[count:]
    assert len(again) == count
    assert all(headers.get("If-None-Match", "").startswith('W/"') for _, headers in again)
    assert github.answers[count:] == [304] * count
    assert second.as_json() | {"age_s": 0, "fetched_at": 0} == first.as_json() | {"age_s": 0, "fetched_at": 0}


def _age_cache(cache: Path, seconds: float) -> None:
    for file in cache.glob("*.json"):
        entry = json.loads(file.read_text())
        entry["fetched_at"] -= seconds
        file.write_text(json.dumps(entry))


def test_offline_answers_from_the_cache_with_its_age(github, tmp_path, lockfile, tracked):
    online = upstream.check(lockfile, tracked, _api(github, tmp_path))
    _age_cache(tmp_path / "cache", 3 * 3600)
    count = len(github.seen)
    offline = upstream.check(lockfile, tracked, _api(github, tmp_path, offline=True))
    assert len(github.seen) == count                      # nothing was asked
    assert offline.offline and 3 * 3600 <= offline.age_s < 3 * 3600 + 60
    assert upstream.age(offline.age_s) == "3 h ago"
    assert [r.contains for r in offline.releases] == [r.contains for r in online.releases]
    assert [i.state for i in offline.items] == [i.state for i in online.items]


def test_an_unreachable_api_falls_back_to_the_cache(github, tmp_path, lockfile, tracked):
    upstream.check(lockfile, tracked, _api(github, tmp_path))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    api = upstream.GitHub(base_url=f"http://127.0.0.1:{port}", cache=tmp_path / "other-cache")
    with pytest.raises(CheckFailed, match="nothing is cached yet"):
        upstream.check(lockfile, tracked, api)
    # Same base URL as the cache: the server stops answering, the cache answers instead.
    github.shutdown()
    github.server_close()
    report = upstream.check(lockfile, tracked, _api(github, tmp_path, timeout=2))
    assert report.offline and "cannot reach" in report.offline_reason
    assert report.main_commit == MAIN and report.releases[0].has_every_fix


def test_rate_limited_uses_the_cache_and_says_so(github, tmp_path, lockfile, tracked):
    upstream.check(lockfile, tracked, _api(github, tmp_path))
    github.rate_limited = True
    report = upstream.check(lockfile, tracked, _api(github, tmp_path))
    assert report.offline and report.offline_reason.startswith("GitHub's rate limit is spent until")
    assert report.requests == 1 and report.main_commit == MAIN
    with pytest.raises(CheckFailed, match="set GITHUB_TOKEN"):
        upstream.check(lockfile, tracked, upstream.GitHub(base_url=github.url, cache=tmp_path / "empty"))


def _run_task(monkeypatch, github, tmp_path, lock: Path, track: Path | None, capsys, **flags):
    monkeypatch.setenv("GITHUB_API_URL", github.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(console.out, "width", 250)
    cli.upstream(Context(), lock=str(lock), track=str(track) if track else "", **flags)
    return capsys.readouterr()


def test_the_token_is_sent_but_never_shown_or_stored(monkeypatch, github, tmp_path, lockfile, capsys):
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    shown = _run_task(monkeypatch, github, tmp_path, lockfile.path, None, capsys)
    shown_json = _run_task(monkeypatch, github, tmp_path, lockfile.path, None, capsys, json=True)
    assert all(headers["Authorization"] == f"Bearer {TOKEN}" for _, headers in github.seen)
    for said in (shown.out, shown.err, shown_json.out, shown_json.err):
        assert TOKEN not in said
    assert "newer than 1.2.0rc1 ([source] version); holds every required fix" in shown.out
    assert json.loads(shown_json.out)["releases"][1]["contains"] == {"7937": True, "8944": False}
    cached = list((tmp_path / "xdg" / "trtllm-deploy" / "github").glob("*.json"))
    assert cached and not any(TOKEN in file.read_text() for file in cached)


def test_a_refused_token_exits_1_without_showing_it(monkeypatch, github, tmp_path, lockfile, capsys):
    monkeypatch.setenv("GITHUB_TOKEN", REFUSED)
    with pytest.raises(Exit) as caught:
        _run_task(monkeypatch, github, tmp_path, lockfile.path, None, capsys)
    assert caught.value.code == 1 and "401 Bad credentials" in caught.value.message
    assert REFUSED not in caught.value.message


def test_the_task_offline_shows_the_cache_age(monkeypatch, github, tmp_path, lockfile, tracked, capsys):
    _run_task(monkeypatch, github, tmp_path, lockfile.path, None, capsys)
    _age_cache(tmp_path / "xdg" / "trtllm-deploy" / "github", 2 * 86400)
    shown = _run_task(monkeypatch, github, tmp_path, lockfile.path, None, capsys, offline=True)
    assert "offline (--offline): from the cache, fetched 2 days ago" in shown.out
    assert "missing #8944" in shown.out


def test_offline_with_nothing_cached_exits_1(monkeypatch, github, tmp_path, lockfile, capsys):
    with pytest.raises(Exit) as caught:
        _run_task(monkeypatch, github, tmp_path, lockfile.path, None, capsys, offline=True)
    assert caught.value.code == 1 and "once with network access" in caught.value.message
    assert github.seen == []


def test_the_shipped_lock_and_track_list(monkeypatch, github, tmp_path, capsys):
    """The project's own lock (v1.3.0rc26 pinned) and requirements/upstream.toml."""
    shipped = locks.load(locks.DEFAULT_PATH)
    report = upstream.check(shipped, upstream.load_tracked(None), _api(github, tmp_path))
    assert report.pinned_commit == shipped.lock.source.commit == "c295dd9fca143a3fdd2769617699fdd4d4a93eb5"
    assert report.main_ahead_of_pin is None          # no recorded comparison with that commit: a 404
    # The newest recorded release, 1.3.0rc1, is older than the pinned 1.3.0rc26.
    assert [r.newer_than_pin for r in report.releases] == [False, False]
    assert report.compared_with == "1.3.0rc26 ([source] version)"
    states = {item.number: (item.required, item.state) for item in report.items}
    assert states[7937] == (True, "merged") and states[8474] == (False, "open")
    assert states[8803] == (False, "not found")           # not among the recordings: a real 404


@pytest.mark.parametrize("text, expected", [
    ("[[track]]\nnumber = \"8474\"\n", ":2: track[0].number: expected an integer"),
    ("[[track]]\nnumber = 8474\n\n[[track]]\nnumbr = 1\n", ":5: track[1].numbr: unknown key"),
], ids=["string-number", "misspelt-key"])
def test_a_wrong_track_file_names_file_line_and_key(tmp_path, text, expected):
    path = tmp_path / "upstream.toml"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        upstream.load_tracked(path)
    assert caught.value.exit_code == 2 and f"{path}{expected}" in str(caught.value)


def test_a_lock_not_on_github_is_bad_input(tmp_path, github):
    path = tmp_path / "lock.toml"
    path.write_text('[source]\nrepository = "https://gitlab.example/x/TensorRT-LLM.git"\n\n[build]\n')
    with pytest.raises(InputError, match=r"lock.toml:2: source.repository: .* is not a GitHub repository"):
        upstream.check(locks.load(path), [], _api(github, tmp_path))
    assert github.seen == []


def _release(tag: str, prerelease: bool, draft: bool = False) -> dict:
    """A release shaped as the recorded ones (releases.json), under another tag."""
    recorded = json.loads((DATA / "repos/NVIDIA/TensorRT-LLM/releases.json").read_text())[0]
    return recorded | {"tag_name": tag, "name": tag, "prerelease": prerelease, "draft": draft,
                       "html_url": f"https://github.com/NVIDIA/TensorRT-LLM/releases/tag/{tag}"}


# Release candidates fill the first pages; the newest stable release is on page 3 (a draft of a
# stable one, on page 2, does not count); page 4 must never be asked for.
PAGES = [[_release("v1.3.0rc5", True), _release("v1.3.0rc4", True)],
         [_release("v1.3.0", False, draft=True), _release("v1.3.0rc3", True)],
         [_release("v1.3.0rc2", True), _release("v1.2.0", False), _release("v1.2.0rc9", True)],
         [_release("v1.1.0", False)]]


def _release_requests(github: FakeGitHub) -> list[str]:
    return [path for path, _ in github.seen if urlsplit(path).path in RELEASE_PATHS]


def test_the_newest_stable_release_is_found_pages_down(github, tmp_path, lockfile):
    github.release_pages = PAGES
    report = upstream.check(lockfile, [], _api(github, tmp_path))
    assert [(r.tag, r.prerelease) for r in report.releases] == [("v1.3.0rc5", True), ("v1.2.0", False)]
    assert _release_requests(github) == [
        "/repos/NVIDIA/TensorRT-LLM/releases?per_page=100",
        "/repositories/249136627/releases?per_page=100&page=2",
        "/repositories/249136627/releases?per_page=100&page=3"]       # found: page 4 is not asked for
    # Again: every page is asked with its ETag and answered 304, and the pages still chain.
    count = len(github.seen)
    again = upstream.check(lockfile, [], _api(github, tmp_path))
    assert [r.tag for r in again.releases] == ["v1.3.0rc5", "v1.2.0"]
    assert _release_requests(github)[3:] == _release_requests(github)[:3]
    assert github.answers[count:count + 3] == [304, 304, 304]
    # Offline: the cache keeps each page's Link, so the same pages are read without asking.
    count = len(github.seen)
    offline = upstream.check(lockfile, [], _api(github, tmp_path, offline=True))
    assert [r.tag for r in offline.releases] == ["v1.3.0rc5", "v1.2.0"] and len(github.seen) == count


def test_paging_stops_at_the_last_page_and_at_the_limit(github, tmp_path, lockfile, monkeypatch):
    github.release_pages = [page for page in PAGES[:2]]             # no stable release at all
    report = upstream.check(lockfile, [], _api(github, tmp_path))
    assert [r.tag for r in report.releases] == ["v1.3.0rc5"] and len(_release_requests(github)) == 2
    github.release_pages, github.seen = PAGES, []
    monkeypatch.setattr(upstream, "MAX_RELEASE_PAGES", 2)
    report = upstream.check(lockfile, [], _api(github, tmp_path / "fresh"))
    assert [r.tag for r in report.releases] == ["v1.3.0rc5"] and len(_release_requests(github)) == 2


def test_a_next_page_on_another_host_is_not_followed(github, tmp_path, lockfile):
    """The token goes to the API it was given for, never to a host a Link header names."""
    github.release_pages = PAGES
    api = upstream.GitHub(base_url=github.url.replace("127.0.0.1", "localhost"), cache=tmp_path / "cache",
                          token=TOKEN)
    report = upstream.check(lockfile, [], api)
    assert [r.tag for r in report.releases] == ["v1.3.0rc5"] and len(_release_requests(github)) == 1
