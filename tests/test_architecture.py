"""The package's architecture, checked: layers, no import cycles, small modules, runtimes as data,
one way to run a remote script, docstring-only package files, standalone files that stay standalone.

Every check is a function of the package's folder, so the same checks run on a small synthetic tree
where each is broken once on purpose (the second half of this file): a check that cannot fail is
not a check. Pure: reads source with ``ast``, imports nothing of the package, needs no Docker.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trtllm_deploy"

# Lowest first. A module may import its own layer or lower ones. The top-level modules of the
# package (errors, secrets, console, tomlsource, ...) are the foundation.
LAYERS = ("foundation", "hosts", "network", "source", "runtimes", "artifact", "push", "serving", "measure",
          "testbed", "cli")
MAX_LINES = 400
# The node agent is shipped to each node as one file and run there with the standard library only,
# so it is not split like the others.
LONGER_ALLOWED = {"push/agent.py"}
# Where a runtime may be named: its own module, its stand-in, and data files.
RUNTIME_NAME = re.compile("vllm", re.IGNORECASE)
RUNTIME_MODULES = {"runtimes/vllm.py", "testbed/standin/vllm.py"}
# `sh -c` is for remote scripts, and those go through hosts/scripts.py. The exceptions, each a
# program wrapper that nothing else can run, by file and by the name of the wrapper's text (None:
# any, for the few modules that are themselves the mechanism).
SHELL_ALLOWED: dict[str, frozenset[str] | None] = {
    # The mechanism: Script.argv is the one place a script becomes `sh -c TEXT`.
    "hosts/scripts.py": None,
    # Programs mpirun starts on every rank, not scripts run on a node: each rank's wrapper (its pid
    # and log, then exec of the serving program), and mpirun itself left running detached in the
    # head's container, its exit status kept beside its log.
    "serving/launch.py": frozenset({"RANK_WRAPPER", "MPIRUN_WRAPPER"}),
    # mpirun's program on every rank: read the node's own fabric variables, then exec the program.
    "serving/containers.py": frozenset({"_RANK"}),
    # mpirun's program for the cluster probe: the image's python that has mpi4py, then the probe.
    "serving/clustercheck.py": frozenset({"FIND_PYTHON"}),
    # vLLM's serving program: its node rank taken from the MPI rank, headless on all but the first.
    "runtimes/vllm.py": frozenset({"NODE_RANK"}),
}
SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash"}
DOCSTRING_ONLY = ("hosts", "network", "source", "runtimes", "artifact", "serving", "measure", "testbed")
INTERFACE_MODULES = ("trtllm_deploy.runtimes.interface", *(
    f"trtllm_deploy.runtimes.interface.{name}"
    for name in ("args", "argsource", "cli", "extract", "gaps", "pinned")))
# Files shipped where the package is not installed: what each may import besides the standard
# library (a name ending in "." admits its own folder's relative imports).
STANDALONE: dict[str, frozenset[str]] = {
    "push/agent.py": frozenset(),          # copied to each node and run with its python3
    "artifact/manifest.py": frozenset(),   # shipped beside the agent, and into the stand-in image
    "artifact/headagent.py": frozenset(),  # copied to the head: engine.build's download and artifact
    "testbed/standin/": frozenset({".", "mpi4py", "yaml", "trtllm_deploy.artifact.manifest",
                                   *INTERFACE_MODULES}),
    # Copied into the stand-in image too: the pinned interface the stand-in takes exactly.
    "runtimes/interface/": frozenset({".", "yaml", *INTERFACE_MODULES}),
}


@dataclass(frozen=True)
class Module:
    name: str      # dotted: trtllm_deploy.hosts.targets
    path: Path
    rel: str       # hosts/targets.py
    tree: ast.Module
    lines: int

    @property
    def layer(self) -> str | None:
        """A top-level module is the foundation; any other is its package's layer, if it has one."""
        top = self.rel.split("/")[0]
        if top.endswith(".py"):
            return "foundation"
        return top if top in LAYERS[1:] else None

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


@dataclass(frozen=True)
class Import:
    line: int
    text: str      # as written, for the message
    target: str    # the module it resolves to, dotted


def load(package: Path) -> dict[str, Module]:
    """Every module of the package, by dotted name."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        text = path.read_text()
        modules[".".join(parts)] = Module(".".join(parts), path, path.relative_to(package).as_posix(),
                                          ast.parse(text, str(path)), len(text.splitlines()))
    return modules


def imports(module: Module, modules: dict[str, Module]) -> Iterator[Import]:
    """Every import of the package's own modules, at any depth (function-level ones too)."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "trtllm_deploy":
                    yield Import(node.lineno, f"import {alias.name}", _existing(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "trtllm_deploy":
                continue
            written = f"from {'.' * node.level}{node.module or ''} import "
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(node.lineno, written + alias.name,
                             sub if sub in modules else _existing(base, modules))


def _existing(name: str, modules: dict[str, Module]) -> str:
    """The longest prefix of ``name`` that is a module (``a.b.C`` → ``a.b``)."""
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


# --- the checks: each takes the package folder and returns what is wrong, one line each --------

def layering(package: Path) -> list[str]:
    modules = load(package)
    found = []
    for module in modules.values():
        if module.layer is None:
            found.append(f"{module.rel}: in no layer (add its package to LAYERS, in its place)")
            continue
        rank = LAYERS.index(module.layer)
        for imp in imports(module, modules):
            layer = modules[imp.target].layer if imp.target in modules else None
            if layer is not None and LAYERS.index(layer) > rank:
                found.append(f"{module.rel}:{imp.line}: `{imp.text}` — layer {module.layer} imports "
                             f"the higher layer {layer}")
    return found


def cycles(package: Path) -> list[str]:
    modules = load(package)
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for module in modules.values():
        for imp in imports(module, modules):
            if imp.target != module.name and imp.target in modules:
                graph[module.name].setdefault(imp.target, imp)
    found = []
    for component in _strongly_connected(graph):
        if len(component) > 1:
            path = _cycle_in(graph, component)
            steps = [f"{modules[a].rel}:{graph[a][b].line} `{graph[a][b].text}`"
                     for a, b in pairwise(path)]
            found.append("import cycle: " + " → ".join(steps))
    return found


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def _cycle_in(graph: dict[str, dict[str, Import]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module (breadth first: the shortest)."""
    start, members = component[0], set(component)
    came_from = {start: start}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if child in members and child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle in {component}")


def sizes(package: Path) -> list[str]:
    return [f"{m.rel}: {m.lines} lines (at most {MAX_LINES}; split it by responsibility)"
            for m in load(package).values() if m.lines > MAX_LINES and m.rel not in LONGER_ALLOWED]


def runtime_names(package: Path) -> list[str]:
    found = []
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = path.relative_to(package).as_posix()
        if rel in RUNTIME_MODULES or path.suffix == ".toml":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if RUNTIME_NAME.search(line):
                found.append(f"{rel}:{number}: names a runtime outside its module: {line.strip()}")
    return found


def shell_scripts(package: Path) -> list[str]:
    found = []
    for module in load(package).values():
        allowed = SHELL_ALLOWED.get(module.rel, frozenset())
        if allowed is None:
            continue
        # A wrapper is named by the constant holding its text, or by the constant it is part of.
        assigned = {id(node.value): node.targets[0].id for node in module.tree.body
                    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
        for node in sorted(ast.walk(module.tree), key=lambda node: getattr(node, "lineno", 0)):
            if isinstance(node, (ast.List, ast.Tuple)):
                items = node.elts
            elif isinstance(node, ast.Call):
                items = node.args
            else:
                continue
            for at, (shell, flag) in enumerate(pairwise(items)):
                if _constant(shell) in SHELLS and _constant(flag) == "-c":
                    text = items[at + 2] if at + 2 < len(items) else None
                    name = text.id if isinstance(text, ast.Name) else (
                        text.attr if isinstance(text, ast.Attribute) else assigned.get(id(node)))
                    if name not in allowed:
                        found.append(f"{module.rel}:{node.lineno}: `{_constant(shell)} -c "
                                     f"{name or '<text>'}` — a remote script goes through "
                                     "hosts/scripts.py (a Script constant and scripts.run)")
    return found


def _constant(node: ast.expr | None) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def docstring_only(package: Path) -> list[str]:
    found = []
    for name in DOCSTRING_ONLY:
        path = package / name / "__init__.py"
        if not path.exists():
            found.append(f"{name}/__init__.py: missing")
            continue
        body = ast.parse(path.read_text()).body
        has_docstring = bool(body) and isinstance(body[0], ast.Expr) and isinstance(
            _constant(body[0].value), str)
        extra = body[1:] if has_docstring else body
        if not has_docstring or extra:
            what = f"line {extra[0].lineno}" if extra else "no docstring"
            found.append(f"{name}/__init__.py: holds more than a docstring ({what}); "
                         "put the code in a module of the package")
    return found


def standalone(package: Path) -> list[str]:
    modules = load(package)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    found = []
    for module in modules.values():
        where = next((key for key in STANDALONE
                      if module.rel == key or (key.endswith("/") and module.rel.startswith(key))),
                     None)
        if where is None:
            continue
        allowed = STANDALONE[where]
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                names = [(alias.name, alias.name, f"import {alias.name}") for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                # "." is the file's own folder; anything further up leaves what is shipped
                own = "." if node.level == 1 else ".."
                names = [(own, own, f"from {'.' * node.level}{node.module or ''} import …")]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "", f"{node.module}.{alias.name}", f"from {node.module} import …")
                         for alias in node.names]
            else:
                continue
            for name, full, text in names:
                if name.split(".")[0] in stdlib or name in allowed or full in allowed:
                    continue
                found.append(f"{module.rel}:{node.lineno}: `{text}` — it is shipped standalone "
                             "and may use only the standard library" + (
                                 f" and {', '.join(sorted(allowed))}" if allowed else ""))
    return found


CHECKS: dict[str, Callable[[Path], list[str]]] = {
    "lower-layers-never-import-higher-ones": layering,
    "no-import-cycles": cycles,
    f"no-module-over-{MAX_LINES}-lines": sizes,
    "runtimes-named-only-in-their-modules-and-data": runtime_names,
    "remote-scripts-only-through-hosts-scripts": shell_scripts,
    "layer-package-files-hold-only-a-docstring": docstring_only,
    "shipped-files-use-only-the-standard-library": standalone,
}


@pytest.mark.parametrize("check", CHECKS.values(), ids=CHECKS.keys())
def test_the_package(check: Callable[[Path], list[str]]) -> None:
    found = check(PACKAGE)
    assert not found, f"{len(found)} found:\n  " + "\n  ".join(found)


# --- each check fails when it should: a small clean tree, broken once per case ----------------

CLEAN = {
    "__init__.py": '"""The package."""\n',
    "errors.py": '"""Errors."""\n',
    "hosts/__init__.py": '"""Hosts."""\n',
    "hosts/targets.py": '"""Targets."""\nfrom trtllm_deploy import errors\n',
    "hosts/scripts.py": ('"""Scripts."""\nfrom trtllm_deploy.hosts.targets import errors\n'
                         'def argv(text):\n    return ["sh", "-c", text]\n'),
    "runtimes/__init__.py": '"""Runtimes."""\n',
    "runtimes/vllm.py": '"""vLLM."""\nIMAGE = "nvcr.io/nvidia/vllm"\n',
    "runtimes/data.toml": 'name = "vllm"\n',
    **{f"{name}/__init__.py": f'"""{name}."""\n' for name in ("network", "source", "artifact", "serving",
                                                                "measure", "testbed")},
    "artifact/manifest.py": '"""Manifest."""\nimport hashlib\nimport json\n',
    "push/__init__.py": '"""Push."""\nfrom trtllm_deploy.hosts import scripts\n',
    "push/agent.py": '"""Agent."""\nimport os\n' + "x = 1\n" * 450,
    "serving/launch.py": ('"""Launch."""\nfrom . import mpi\nRANK_WRAPPER = "exec \\"$@\\""\n'
                          'def argv(p):\n    return mpi.run(["sh", "-c", RANK_WRAPPER, *p])\n'),
    "serving/mpi.py": '"""mpirun."""\ndef run(argv):\n    return argv\n',
    "serving/clustercheck.py": '"""Probe."""\nFIND_PYTHON = ["sh", "-c", \'exec python3 "$@"\', "sh"]\n',
    "testbed/standin/__init__.py": '"""Stand-in."""\n',
    "testbed/standin/cli.py": ('"""Its command line."""\nfrom . import serve\n'
                               'from trtllm_deploy.artifact import manifest\n'),
    "testbed/standin/serve.py": '"""Serves."""\nimport yaml\n',
    "cli/__init__.py": '"""Tasks."""\nfrom trtllm_deploy.serving import launch\n',
}

BROKEN = [  # (id, check, file, text appended to it, what the report must say)
    pytest.param("lower-layers-never-import-higher-ones", "hosts/targets.py",
                 "def f():\n    from trtllm_deploy.serving import launch\n",
                 "hosts/targets.py:4: `from trtllm_deploy.serving import launch`", id="layer-in-a-function"),
    pytest.param("lower-layers-never-import-higher-ones", "hosts/targets.py",
                 "import trtllm_deploy.cli\n", "layer hosts imports the higher layer cli",
                 id="layer-plain-import"),
    pytest.param("lower-layers-never-import-higher-ones", "serving/mpi.py",
                 "from ..testbed import standin\n", "serving/mpi.py:4: `from ..testbed import standin`",
                 id="layer-relative-import"),
    pytest.param("lower-layers-never-import-higher-ones", "nodes/__init__.py", '"""New."""\n',
                 "nodes/__init__.py: in no layer", id="package-in-no-layer"),
    pytest.param("no-import-cycles", "serving/mpi.py", "from trtllm_deploy.serving import launch\n",
                 "serving/launch.py:2 `from . import mpi` → serving/mpi.py:4 "
                 "`from trtllm_deploy.serving import launch`", id="cycle"),
    pytest.param(f"no-module-over-{MAX_LINES}-lines", "serving/mpi.py", "x = 1\n" * MAX_LINES,
                 f"serving/mpi.py: {MAX_LINES + 3} lines", id="module-too-long"),
    pytest.param("runtimes-named-only-in-their-modules-and-data", "serving/launch.py",
                 'if runtime == "VLLM":\n    pass\n', 'serving/launch.py:6: names a runtime',
                 id="runtime-named-in-launch"),
    pytest.param("remote-scripts-only-through-hosts-scripts", "serving/mpi.py",
                 'LOOK = "ls"\ndef look(t):\n    return t.run(["sh", "-c", LOOK])\n',
                 "serving/mpi.py:6: `sh -c LOOK`", id="script-outside-scripts"),
    pytest.param("remote-scripts-only-through-hosts-scripts", "serving/launch.py",
                 'def look(t):\n    return t.run(("bash", "-c", "ls"))\n',
                 "serving/launch.py:7: `bash -c <text>`", id="script-in-an-allowed-file-not-a-wrapper"),
    pytest.param("remote-scripts-only-through-hosts-scripts", "serving/clustercheck.py",
                 'LOOK = ["sh", "-c", "ls"]\n', "serving/clustercheck.py:3: `sh -c LOOK`",
                 id="script-constant-not-a-wrapper"),
    pytest.param("layer-package-files-hold-only-a-docstring", "serving/__init__.py",
                 "from trtllm_deploy.serving.launch import argv\n",
                 "serving/__init__.py: holds more than a docstring (line 2)", id="package-file-with-code"),
    pytest.param("shipped-files-use-only-the-standard-library", "push/agent.py",
                 "from trtllm_deploy.hosts import scripts\n",
                 "push/agent.py:453: `from trtllm_deploy.hosts import …`", id="agent-imports-the-package"),
    pytest.param("shipped-files-use-only-the-standard-library", "artifact/manifest.py",
                 "import yaml\n", "artifact/manifest.py:4: `import yaml`", id="manifest-imports-yaml"),
    pytest.param("shipped-files-use-only-the-standard-library", "testbed/standin/serve.py",
                 "from ...hosts import targets\n", "testbed/standin/serve.py:3", id="standin-leaves-itself"),
]


def write(root: Path, files: dict[str, str]) -> Path:
    package = root / "trtllm_deploy"
    for rel, text in files.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    return package


@pytest.mark.parametrize("name", CHECKS.keys())
def test_the_clean_tree_passes(tmp_path: Path, name: str) -> None:
    assert CHECKS[name](write(tmp_path, CLEAN)) == []


@pytest.mark.parametrize("name, rel, added, said", BROKEN)
def test_each_check_fails_when_broken(tmp_path: Path, name: str, rel: str, added: str, said: str) -> None:
    package = write(tmp_path, {**CLEAN, rel: CLEAN.get(rel, "") + added})
    found = CHECKS[name](package)
    assert len(found) == 1 and said in found[0], found
    for other, check in CHECKS.items():  # the break is found by its own check only
        if other != name:
            assert check(package) == [], other
