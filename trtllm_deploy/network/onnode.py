"""The program fabric.setup runs on a node (as root, standard library only), shipped by apply.py.

``state``: the fabric ports, routes and netplan file as they are. ``apply``: validate the new netplan
file (``netplan generate --root-dir`` where netplan is installed), save what is there, start a
detached watchdog, then change: ``netplan apply`` where netplan and systemd run (DGX OS), else the
same addresses, MTU and routes live with ``ip``. ``confirm``: the change may stay (the watchdog is
told, then stopped). The watchdog, unless confirmed within its seconds, puts everything it saved
back and writes what it did to ``reverted.json``; ``outcome`` reads it. Confirming and reverting
race for one file created exclusively, so exactly one of them happens (``netplan try``'s idea).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def _ip(*args):
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _port_state(name):
    if not os.path.exists(f"/sys/class/net/{name}"):
        return None
    found = json.loads(_ip("-j", "addr", "show", "dev", name) or "[]")
    if not found:
        return None
    entry = found[0]
    addresses = [f"{a['local']}/{a['prefixlen']}" for a in entry.get("addr_info", [])
                 if a.get("scope") != "link"]
    return {"addresses": addresses, "mtu": entry.get("mtu"), "up": "UP" in entry.get("flags", [])}


def _routes(ports):
    found = []
    for route in json.loads(_ip("-j", "-4", "route", "show") or "[]"):
        if route.get("dev") in ports and route.get("protocol") != "kernel":
            to = route["dst"] if "/" in route["dst"] or route["dst"] == "default" else route["dst"] + "/32"
            found.append({"to": to, "via": route.get("gateway"), "dev": route["dev"]})
    return found


def _read(path):
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def state(want):
    ports = want["ports"]
    netplan = shutil.which("netplan") is not None
    return {"root": os.geteuid() == 0, "netplan": netplan,
            "systemd": os.path.isdir("/run/systemd/system"), "file": _read(want["file"]),
            "ports": {name: _port_state(name) for name in ports}, "routes": _routes(ports)}


def _validate(want):
    if shutil.which("netplan") is None:
        return "no netplan here: the file was checked by fabric.setup only"
    root = tempfile.mkdtemp(prefix="trtllm-fabric-")
    try:
        os.makedirs(os.path.join(root, "etc", "netplan"))
        with open(os.path.join(root, want["file"].lstrip("/")), "w") as handle:
            handle.write(want["text"])
        done = subprocess.run(["netplan", "generate", "--root-dir", root], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"netplan generate refused the file: {(done.stderr or done.stdout).strip()}")
        return "netplan generate --root-dir accepted it"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _write_file(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if text is None:
        if os.path.exists(path):
            os.remove(path)
        return
    temporary = path + ".trtllm-deploy-new"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def _live(ports, routes, old_routes):
    """Make the ports carry exactly ``ports``' addresses and MTU, and the routes ``routes``."""
    for name, want in ports.items():
        have = _port_state(name) or {"addresses": []}
        _ip("link", "set", "dev", name, "mtu", str(want["mtu"]))
        _ip("link", "set", "dev", name, "up")
        for cidr in have["addresses"]:
            if cidr not in want["addresses"]:
                _ip("addr", "del", cidr, "dev", name)
        for cidr in want["addresses"]:
            if cidr not in have["addresses"]:
                _ip("addr", "add", cidr, *(["brd", "+"] if ":" not in cidr else []), "dev", name)
    wanted = {(r["to"], r["via"], r["dev"]) for r in routes}
    for route in old_routes:
        if (route["to"], route["via"], route["dev"]) not in wanted:
            subprocess.run(["ip", "route", "del", route["to"], "dev", route["dev"]], capture_output=True)
    for route in routes:
        _ip("route", "replace", route["to"], *(["via", route["via"]] if route["via"] else []),
            "dev", route["dev"])


def _change(want, saved_routes):
    if want["mode"] == "netplan apply":
        done = subprocess.run(["netplan", "apply"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"netplan apply: {(done.stderr or done.stdout).strip()}")
    else:
        _live(want["ports"], want["routes"], saved_routes)


def apply(want):
    folder = want["dir"]
    checked = _validate(want)
    os.makedirs(folder, mode=0o700)
    before = state(want)
    with open(os.path.join(folder, "previous.json"), "w") as handle:
        json.dump({"want": want, "before": before}, handle)
    shutil.copy(__file__, os.path.join(folder, "onnode.py"))
    log = open(os.path.join(folder, "watchdog.log"), "w")
    watchdog = subprocess.Popen([sys.executable, os.path.join(folder, "onnode.py"), "watchdog", folder],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                close_fds=True)
    with open(os.path.join(folder, "watchdog.pid"), "w") as handle:
        handle.write(str(watchdog.pid))
    if before["file"] is not None and before["file"] != want["text"]:
        _write_file(want["file"] + ".previous", before["file"])
    _write_file(want["file"], want["text"])
    _change(want, before["routes"])
    return {"validated": checked, "watchdog": watchdog.pid, "mode": want["mode"], "dir": folder}


def _decide(folder, what):
    """True for the first of confirm and revert to get here; False for the second."""
    try:
        os.close(os.open(os.path.join(folder, "decided"), os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    with open(os.path.join(folder, "decided"), "w") as handle:
        handle.write(what)
    return True


def confirm(folder):
    if not _decide(folder, "confirmed"):
        return {"confirmed": False, "outcome": outcome(folder)}
    try:
        os.kill(int(_read(os.path.join(folder, "watchdog.pid"))), signal.SIGTERM)
    except (ProcessLookupError, ValueError, TypeError):
        pass
    return {"confirmed": True}


def restore(folder):
    with open(os.path.join(folder, "previous.json")) as handle:
        saved = json.load(handle)
    want, before = saved["want"], saved["before"]
    _write_file(want["file"], before["file"])
    ports = {name: {"addresses": port["addresses"], "mtu": port["mtu"]}
             for name, port in before["ports"].items() if port}
    previous = dict(want, ports=ports, routes=before["routes"])
    current = _routes(list(want["ports"]))
    _change(previous, current)
    for name, port in before["ports"].items():
        if port and not port["up"]:
            _ip("link", "set", "dev", name, "down")


def watchdog(folder):
    with open(os.path.join(folder, "previous.json")) as handle:
        seconds = json.load(handle)["want"]["seconds"]
    time.sleep(seconds)
    if not _decide(folder, "reverted"):
        return
    report = {"reverted_after_s": seconds, "at": time.time()}
    try:
        restore(folder)
        report["ok"] = True
    except Exception as error:  # noqa: BLE001 - whatever it was, it is reported
        report.update(ok=False, error=f"{type(error).__name__}: {error}")
    with open(os.path.join(folder, "reverted.json"), "w") as handle:
        json.dump(report, handle)


def outcome(folder):
    decided = _read(os.path.join(folder, "decided"))
    reverted = _read(os.path.join(folder, "reverted.json"))
    return {"decided": decided, "reverted": json.loads(reverted) if reverted else None,
            "exists": os.path.isdir(folder)}


def main(argv):
    command = argv[1]
    if command == "watchdog":
        watchdog(argv[2])
        return
    if command in ("confirm", "outcome"):
        result = (confirm if command == "confirm" else outcome)(argv[2])
    else:
        want = json.loads(argv[2])
        result = state(want) if command == "state" else apply(want)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
