"""The head's supervisor steps aside while this machine changes what serves.

An installed supervisor (install.py) owns the cluster's record on the head and relaunches whatever
stops serving. So ``invoke launch``, ``stop``, ``rollback`` and deploy's launch phase would be undone
by it: the job they stop is a failure to it. :func:`steps_aside` wraps such a change: the supervisor
is stopped (its container, or its systemd unit) and its record — the newest, with what it promoted
or rolled back to — is taken here first; after the change, whatever happened (a failure and Ctrl-C
included), this machine's record goes back to the head and the supervisor starts again, watching
what now serves (or idle, after a stop). Both ends are written in its history.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.hosts import scripts
from trtllm_deploy.hosts.connections import connect
from trtllm_deploy.hosts.inventory import Cluster
from trtllm_deploy.hosts.scripts import Script
from trtllm_deploy.serving import install, state
from trtllm_deploy.serving.servicefiles import HISTORY, STATE_DIR, name_of

KEPT = ("current", "last_good", "good")   # what the two records share

# The supervisor stopped or started, the way it was installed ($1: mode, $2: name, $3: stop|start).
CONTROL = Script("stop or start the head's supervisor", """set -e
case "$1" in
  container)
    if [ "$3" = stop ]; then docker stop --time 30 "$2" >/dev/null; else docker start "$2" >/dev/null; fi ;;
  system) sudo -n systemctl "$3" "$2.service" ;;
  user) systemctl --user "$3" "$2.service" ;;
  *) echo "unknown mode $1" >&2; exit 2 ;;
esac
""")
# One history line appended ($1: the history file, $2: the JSON line).
NOTE = Script("add to the supervisor's history", """
printf '%s\\n' "$2" >> "$1"
""")
# The record written whole ($1: the file; the JSON on stdin), replaced in one rename.
PUT_RECORD = Script("give the head the record", """set -e
umask 077
cat > "$1.tmp"
mv -f "$1.tmp" "$1"
""")


def _event(event: str, text: str) -> str:
    return json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event,
                       "text": text}, sort_keys=True)


@contextmanager
def steps_aside(cluster: Cluster, doing: str, report=lambda line: None) -> Iterator[bool]:
    """Around a change of what serves (``doing``: what this machine runs, for the history): the
    head's supervisor, where one is installed, paused and given back the record afterwards. Yields
    whether one was. Where none is installed it costs one look at the head."""
    target = connect(cluster.head)
    try:
        found = install.look(cluster, target, lines=0)
    except BaseException:
        target.close()
        raise
    if not found.installed:
        target.close()
        yield False
        return
    try:
        mode, name, home = found.record.get("mode", "container"), name_of(cluster), target.home()
        history = f"{home}/{STATE_DIR}/{cluster.name}/{HISTORY}"
        record = f"{home}/{STATE_DIR}/{cluster.name}/deployments.json"
        was_running = found.active
        if was_running:
            report(f"pausing the head's supervisor while this machine runs {doing}")
            stopped = scripts.run(target, CONTROL, mode, name, "stop", check=False)
            if not stopped.ok:
                raise CheckFailed(f"the head's supervisor ({mode} {name}) could not be paused, so "
                                  f"{doing} would be undone by it: {stopped.stderr.strip()[:300]}; "
                                  "nothing was changed")
        scripts.run(target, NOTE, history, _event("paused", f"this machine runs {doing}; the supervisor "
                                                  "steps aside until it is done"), check=False)
        if found.deployments:
            state.record(cluster, **{key: found.deployments[key] for key in KEPT if key in found.deployments})
    except BaseException:
        target.close()
        raise
    try:
        yield True
    finally:
        try:
            mine = {key: value for key, value in state.state(cluster).items() if key in KEPT}
            scripts.run(target, PUT_RECORD, record, stdin=json.dumps(mine, indent=2, sort_keys=True))
            serving = (mine.get("current") or {}).get("job")
            scripts.run(target, NOTE, history, _event(
                "resumed", f"{doing} is done; watching {serving}" if serving else f"{doing} is done; "
                "nothing is deployed"), check=False)
            if was_running:
                scripts.run(target, CONTROL, mode, name, "start")
                report("the head's supervisor watches again")
        finally:
            target.close()

