"""``invoke upstream``: the newest TensorRT-LLM releases and main against the lock, and the tracked fixes."""

from __future__ import annotations

import os

from invoke import Context, task

from trtllm_deploy import console
from trtllm_deploy.cli import JSON_HELP, user_errors
from trtllm_deploy.source import lock as locks
from trtllm_deploy.source import upstream as watch

STATE_STYLE = {"merged": "pass", "closed": "pass", "open": "warn"}


def _yes(value: bool | None, yes: str = "yes", no: str = "no") -> object:
    if value is None:
        return console.status_cell("skip", "unknown")
    return console.status_cell("pass" if value else "fail", yes if value else no)


@task(help={
    "lock": f"the TensorRT-LLM lock (default: {locks.DEFAULT_PATH})",
    "track": f"issues and PRs to watch beside the lock's fixes (default: {watch.TRACK_FILE} if present)",
    "offline": "use only what is cached (~/.cache/trtllm-deploy/github), and show its age",
    "json": JSON_HELP,
})
@user_errors
def upstream(c: Context, lock: str = str(locks.DEFAULT_PATH), track: str = "", offline: bool = False,
             json: bool = False) -> None:
    """Which TensorRT-LLM release and main exist against the pinned one, and whether they hold the fixes.

    Reads GitHub's API (GITHUB_API_URL to point elsewhere; GITHUB_TOKEN, if set, raises the rate
    limit and is never printed). Answers are cached; offline or rate limited, the cache is used.
    """
    lockfile = locks.load(lock)
    tracked = watch.load_tracked(track or None)
    api = watch.GitHub(base_url=os.environ.get("GITHUB_API_URL") or watch.API,
                       token=os.environ.get("GITHUB_TOKEN") or None, offline=offline)
    with console.err.status("asking GitHub…" if not offline else "reading the cache…"):
        report = watch.check(lockfile, tracked, api)
    if json:
        console.print_json(report.as_json())
        return
    _show(report)


def _show(report: watch.Report) -> None:
    if report.offline:
        source = f"offline ({report.offline_reason})" if report.offline_reason else "offline (--offline)"
        said = f"{source}: from the cache, fetched {watch.age(report.age_s)}"
    else:
        said = f"from GitHub ({report.requests} requests, unchanged answers free)"
    required = [item.number for item in report.items if item.required]
    rows = [["pinned commit", report.pinned_commit or "none yet (run `invoke source.update`)", ""],
            ["pinned version", report.pinned_version or "not recorded", ""]]
    if report.release_image:
        rows.append(["pinned release image", report.release_image, ""])
    if report.wheel_version:
        rows.append(["pinned wheel", report.wheel_version, ""])
    if report.main_commit:
        ahead = ("" if report.main_ahead_of_pin is None
                 else f"{report.main_ahead_of_pin} commits ahead of the pin")
        rows.append(["main", f"{report.main_commit[:12]} {report.main_date}: {report.main_subject}", ahead])
    else:
        rows.append(["main", console.status_cell("skip", "unknown (not cached)"), ""])
    for release in report.releases:
        kind = ("newest release" if release.prerelease or len(report.releases) == 1
                else "newest stable release")
        newer = {True: f"newer than {report.compared_with}", False: f"not newer than {report.compared_with}",
                 None: ""}[release.newer_than_pin]
        fixes = ("holds every required fix" if release.has_every_fix else
                 "missing " + ", ".join(f"#{n}" for n, held in release.contains.items() if held is False)
                 if any(held is False for held in release.contains.values()) else
                 "fixes unknown" if required else "")
        status = "pass" if release.has_every_fix else ("fail" if "missing" in fixes else "skip")
        rows.append([kind, f"{release.tag} ({release.published_at[:10]})",
                     console.status_cell(status, "; ".join(filter(None, [newer, fixes])))])
    console.out.print(console.table(f"upstream: {report.repository} against {report.lock}",
                                    ["", "value", ""], rows))

    items = []
    for item in report.items:
        state = console.status_cell(STATE_STYLE.get(item.state, "skip"), item.state)
        releases = ", ".join(f"{r.tag} {'✔' if r.contains.get(item.number) else '✘'}"
                             for r in report.releases if r.contains.get(item.number) is not None)
        items.append([f"#{item.number}", item.kind, "required fix" if item.required else "tracked", state,
                      _yes(item.in_pin, "in the pin", "not in the pin") if item.in_pin is not None else "",
                      releases, item.title or item.note])
    if items:
        console.out.print(console.table("tracked issues and pull requests",
                                        ["", "kind", "why", "state", "pinned commit", "releases", "title"],
                                        items))
    console.out.print(said)
