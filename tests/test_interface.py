"""The pinned interface, held to the data taken from upstream (requirements/interface/).

Every table here is the data itself or what the project's own generators emit (cli/usage.py's
``used()`` calls them): the stand-in's ``trtllm-serve`` takes exactly the options of the pinned
``trtllm_serve_cli.yaml``; every LLM-API YAML and every ``trtllm-serve`` / ``vllm serve`` command line
the project builds is accepted by the pinned interface; a wrong flag or key is refused, naming it and
the pinned version.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trtllm_deploy.artifact import build, models
from trtllm_deploy.cli import usage
from trtllm_deploy.runtimes import interface, runtime, trtllm
from trtllm_deploy.runtimes import vllm as vllm_runtime
from trtllm_deploy.runtimes.interface import argsource, extract
from trtllm_deploy.runtimes.interface.gaps import flags_in
from trtllm_deploy.source import lock
from trtllm_deploy.testbed.standin import cli, llmapi
from trtllm_deploy.testbed.standin import vllm as standin_vllm

ROOT = Path(__file__).resolve().parents[1]
PINNED = interface.load()
SERVE = PINNED.cli.options("serve")
LOCK = lock.load(ROOT / lock.DEFAULT_PATH)
FORMATS = usage.served_formats(LOCK.lock.source.trtllm_build)
# The presets alone: the presets file given as the user's file merges to the presets.
CATALOG = models.load(models.PRESETS)
USED = usage.used(CATALOG, FORMATS)
VLLM = argsource.ArgsTable.load(ROOT / vllm_runtime.SERVE_OPTIONS)


def sample(option: interface.CliOption) -> tuple[str, object]:
    """A value of the option's type, as typed on a command line and as click makes it."""
    if option.choices:
        return option.choices[-1], option.choices[-1]
    return {"int": ("7", 7), "float": ("0.25", 0.25), "bool": ("true", True)}.get(option.type, ("x", "x"))


def spellings() -> list:
    """Every spelling of every option of the pinned ``trtllm-serve serve``."""
    return [pytest.param(option, flag, id=flag) for option in SERVE.values() for flag in option.flags]


# ---------------------------------------------------------------------------------------------
# (a) the stand-in's trtllm-serve takes exactly the pinned options


def test_the_reference_has_the_options_the_stand_in_serves_with():
    for name in ("host", "port", "backend", "tensor_parallel_size", "pipeline_parallel_size",
                 "max_batch_size", "max_seq_len", "log_level", "extra_llm_api_options"):
        assert name in SERVE, f"the pinned {PINNED.name} has no trtllm-serve option {name!r}"


def test_every_default_is_the_references():
    values, positionals = cli.parse_serve(["/m"])
    assert positionals == ["/m"]
    assert values == {name: (tuple(option.default or ()) if option.multiple else option.default)
                      for name, option in SERVE.items()}


@pytest.mark.parametrize("option, flag", spellings())
def test_every_spelling_is_taken_with_its_type(option, flag):
    if option.is_flag:
        values, _ = cli.parse_serve(["/m", flag])
        assert values[option.name] is (flag not in option.off_flags)
        assert flag in option.off_flags or values[option.name] is True
        return
    typed, expected = sample(option)
    joined = ["/m", f"{flag}={typed}"] if flag.startswith("--") else ["/m", flag, typed]
    for argv in (["/m", flag, typed], joined):
        values, positionals = cli.parse_serve(argv)
        assert positionals == ["/m"]
        assert values[option.name] == ((expected,) if option.multiple else expected)


@pytest.mark.parametrize("option", [pytest.param(o, id=o.name) for o in SERVE.values() if o.multiple])
def test_a_repeatable_option_keeps_every_value(option):
    typed, expected = sample(option)
    values, _ = cli.parse_serve(["/m", option.flags[0], typed, option.flags[-1], typed])
    assert values[option.name] == (expected, expected)


@pytest.mark.parametrize("option", [pytest.param(o, id=o.name) for o in SERVE.values()
                                    if o.type in ("int", "float") or o.choices])
def test_a_value_of_the_wrong_type_is_refused_like_click(option, capsys):
    assert cli.main(["trtllm-serve", "serve", "/m", option.flags[0], "not-a-value"]) == 2
    err = capsys.readouterr().err
    if option.choices:
        listed = ", ".join(repr(choice) for choice in option.choices)
        assert f"Error: Invalid value for {option.hint}: 'not-a-value' is not one of {listed}." in err
    else:
        kind = "integer" if option.type == "int" else "float"
        assert f"'not-a-value' is not a valid {kind}." in err


@pytest.mark.parametrize("option", [pytest.param(o, id=o.name) for o in SERVE.values() if o.is_flag])
def test_a_flag_takes_no_value(option, capsys):
    assert cli.main(["trtllm-serve", "serve", "/m", f"{option.flags[0]}=1"]) == 2
    assert f"Option '{option.flags[0]}' does not take a value." in capsys.readouterr().err


def unknown_spellings() -> list:
    """Spellings the pin does not have: every option's name with dashes for underscores (a
    mistake the real CLI refuses), where that is not itself a spelling."""
    known = PINNED.cli.by_flag("serve")
    found = {flag.replace("_", "-") for option in SERVE.values() for flag in option.flags} - set(known)
    return sorted(found | {"--not-an-option"})


@pytest.mark.parametrize("flag", unknown_spellings())
def test_an_option_the_pin_lacks_is_refused(flag, capsys):
    assert cli.main(["trtllm-serve", "serve", "/m", flag, "1"]) == 2
    assert f"Error: No such option: {flag}" in capsys.readouterr().err


def test_an_option_the_pin_lacks_is_refused_by_the_program():
    result = subprocess.run([sys.executable, "-m", "trtllm_deploy.testbed.standin", "trtllm-serve", "serve",
                             "/m", "--not-an-option", "1"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("Usage: trtllm-serve serve [OPTIONS] MODEL\n")
    assert result.stderr.endswith("\nError: No such option: --not-an-option\n")


def test_the_help_lists_every_spelling(capsys):
    assert cli.main(["trtllm-serve", "serve", "--help"]) == 0
    out = capsys.readouterr().out
    for option in SERVE.values():
        assert " / ".join(option.flags) in out


# ---------------------------------------------------------------------------------------------
# (b) every LLM-API YAML the project writes is what the pin takes


@pytest.mark.parametrize("where, backend, mapping", [pytest.param(*file, id=file[0]) for file in USED.files])
def test_every_llm_api_yaml_the_project_writes_is_accepted(where, backend, mapping, tmp_path):
    assert PINNED.check_options(mapping, where, backend) == []
    path = tmp_path / build.LLM_API_FILE
    path.write_text(yaml.safe_dump(mapping))
    assert llmapi.load(path, backend) == mapping   # the stand-in reads it as the pin would


def test_the_yaml_files_cover_every_preset_precision_and_node_count():
    expected = {(model.name, precision, nodes) for model in CATALOG.models.values()
                for precision, variant in model.variants.items() for nodes in variant.tp_by_nodes}
    made = (re.fullmatch(r"engine.build's llm-api.yaml for (\S+) (\S+) tp\d+ on (\d+) nodes? \(\w+\)", where)
            for where, _, _ in USED.files)
    seen = {(m[1], m[2], int(m[3])) for m in made if m}
    assert seen == expected
    assert any(where.startswith("testbed/") for where, _, _ in USED.files)


def wrong_keys() -> list:
    """Each key the project writes, misspelt, at its own depth."""
    found = []
    for key in sorted(USED.keys):
        parent, _, leaf = key.rpartition(".")
        found.append(pytest.param(parent, f"{leaf}_typo", id=f"{key}_typo"))
    return found


@pytest.mark.parametrize("parent, wrong", wrong_keys())
def test_a_wrong_key_is_refused_naming_it_and_the_pin(parent, wrong):
    mapping: dict = {}
    node = mapping
    for part in filter(None, parent.split(".")):
        node = node.setdefault(part, {})
    node[wrong] = 1
    name = f"{parent}.{wrong}" if parent else wrong
    found = PINNED.check_options(mapping, "a test")
    assert len(found) == 1 and f"LLM-API key {name!r}" in found[0]
    assert "Extra inputs are not permitted" in found[0]
    assert PINNED.version in found[0] and PINNED.commit[:12] in found[0]


@pytest.mark.parametrize("mapping, location, kind", [
    ({"print_iter_log": "maybe"}, "print_iter_log", "bool_type"),
    ({"max_batch_size": "many"}, "max_batch_size", "int_type"),
    ({"kv_cache_config": {"free_gpu_memory_fraction": 1.5}}, "kv_cache_config.free_gpu_memory_fraction",
     "less_than_equal"),
    ({"kv_cache_config": 0.9}, "kv_cache_config", "model_type"),
    ({"moe_config": {"backend": "NOPE"}}, "moe_config.backend", "literal_error"),
    ({"cuda_graph_config": {"batch_sizes": ["one"]}}, "cuda_graph_config.batch_sizes.0", "int_type"),
    ({"scheduler_config": {"capacity_scheduler_policy": "SOMETIMES"}},
     "scheduler_config.capacity_scheduler_policy", "enum"),
])
def test_values_are_checked_against_the_annotations(mapping, location, kind):
    problems = PINNED.args.validate(mapping)
    assert [(problem.where, problem.type) for problem in problems] == [(location, kind)]


def test_a_wrong_key_in_a_generated_yaml_is_a_gap_naming_it(monkeypatch):
    real = build.llm_api
    monkeypatch.setattr(build, "llm_api",
                        lambda planned: {**real(planned), "kv-cache-config": {}, "kv_cache": {}})
    found = interface.gaps(usage.used(CATALOG, FORMATS), PINNED)
    assert [(gap.kind, gap.name, gap.problem) for gap in found] == [
        ("key", "kv-cache-config", "renamed to kv_cache_config"), ("key", "kv_cache", "missing")]
    assert "LLM-API key kv-cache-config" in str(found[0]) and PINNED.version in str(found[0])
    assert "engine.build's llm-api.yaml for" in str(found[0])


# ---------------------------------------------------------------------------------------------
# (c) every command line the project builds parses against the pin


@pytest.mark.parametrize("where, argv", [pytest.param(*command, id=command[0]) for command in USED.commands])
def test_every_trtllm_serve_command_line_parses(where, argv):
    assert PINNED.check_command(argv, where) == []   # each refusal names the flag and the pin
    values, positionals = PINNED.cli.parse(argv)
    assert positionals == [usage.INSIDE]
    assert values["backend"] in PINNED.backends()


def test_the_command_lines_come_from_launch_and_smoke_for_every_format_served():
    assert {(where.split(" ")[0].rstrip(","), where.rsplit(", a ", 1)[1]) for where, _ in USED.commands} == {
        (source, f"{format} artifact") for source in ("runtimes/trtllm.py", "serving/smoke.py")
        for format in FORMATS}
    ranks = {where.split("rank ")[1].split(",")[0] for where, _ in USED.commands if "rank " in where}
    assert ranks == {"0", "1", "3"}   # every rank's command, the first and the last of each shape


def test_the_formats_served_are_those_the_pin_has_a_backend_for():
    """`--backend tensorrt` only where the pinned reference has it; the lock's trtllm_build agrees."""
    for format in trtllm.RUNTIME.formats:
        backend = dict(zip(*[iter(trtllm.options(format, usage.INSIDE))] * 2, strict=False))["--backend"]
        assert (format in FORMATS) == (backend in PINNED.backends()), (
            f"the lock (trtllm_build = {LOCK.lock.source.trtllm_build}) and the pinned {PINNED.name} "
            f"(--backend {PINNED.backends()}) disagree on serving {format} artifacts")


def test_every_flag_the_project_passes_is_a_pinned_spelling():
    assert set(USED.flags) <= set(PINNED.cli.by_flag("serve"))
    assert interface.gaps(USED, PINNED) == []


@pytest.mark.parametrize("where, argv", [pytest.param(*command, id=command[0])
                                         for command in USED.others[vllm_runtime.NAME]])
def test_every_vllm_serve_command_line_parses(where, argv):
    args = standin_vllm.parser().parse_args([argv[0], *map(argsource.underscores_to_dashes, argv[1:])])
    assert (args.command, args.model_tag) == ("serve", usage.INSIDE)
    for flag in flags_in(argv):
        assert flag in VLLM.flags(), f"vllm serve {flag}: not an option of vLLM {VLLM.version}"


def test_a_wrong_flag_in_a_generated_command_is_a_gap_naming_it(monkeypatch):
    broken = dataclasses.replace(trtllm.RUNTIME,
                                 program=lambda serve: [*trtllm.program(serve), "--tp-size", "2"])
    records = tuple(broken if record is trtllm.RUNTIME else record for record in runtime.known())
    monkeypatch.setattr(runtime, "known", lambda: records)
    found = interface.gaps(usage.used(CATALOG, FORMATS), PINNED)
    assert [(gap.kind, gap.name, gap.problem) for gap in found] == [
        ("flag", "--tp-size", "renamed to --tp_size")]
    text = str(found[0])
    assert "trtllm-serve flag --tp-size" in text and f"the pinned {PINNED.name}" in text
    assert "runtimes/trtllm.py program()" in text


@pytest.mark.parametrize("where, argv", [pytest.param(*USED.commands[0], id="launch")])
def test_a_command_line_the_pin_refuses_names_the_flag_and_the_pin(where, argv):
    assert PINNED.check_command(argv, where) == []
    found = PINNED.check_command([*argv, "--tp-size", "2"], where)
    assert len(found) == 1 and found[0].startswith(f"{where}: trtllm-serve serve: No such option: --tp-size ")
    assert "--tp_size" in found[0] and found[0].endswith(f"(the pinned {PINNED.name})")


def without_option(name: str) -> str:
    """The pinned trtllm_serve_cli.yaml with one option of `serve` deleted."""
    data = yaml.safe_load(PINNED.files["trtllm_serve_cli.yaml"])
    del data["commands"]["serve"]["options"][name]
    return yaml.safe_dump(data)


@pytest.mark.parametrize("name", sorted({PINNED.cli.by_flag("serve")[flag].name for flag in USED.flags
                                         if flag in PINNED.cli.by_flag("serve")}))
def test_a_pin_that_lacks_an_option_we_use_is_refused_naming_it(name):
    newer = dataclasses.replace(PINNED, version="9.9.9", commit="f" * 40,
                                cli=interface.CliReference.from_text(without_option(name)))
    found = interface.gaps(USED, newer)
    lost = set(SERVE[name].flags) & set(USED.flags)
    assert {gap.name for gap in found} == lost
    assert all(gap.problem == "missing" and "TensorRT-LLM 9.9.9" in str(gap) for gap in found)


# ---------------------------------------------------------------------------------------------
# The data: written from upstream texts, read back the same; the extractor


LLM_ARGS = '''
class KvCacheConfig(StrictBaseModel, PybindMirror):
    free_gpu_memory_fraction: Optional[float] = Field(default=0.9, ge=0, le=1, description="...")
    _private: int = PrivateAttr(default=0)

class Policy(StrEnum):
    FCFS = "fcfs"

class Loose(BaseModel):
    name: str = "x"

class TorchLlmArgs(StrictBaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")
    kv_cache_config: KvCacheConfig = Field(default_factory=KvCacheConfig)
    policy: Policy = Field(default=Policy.FCFS)
    speculative_model: Optional[str] = Field(
        default=None, validation_alias=AliasChoices("speculative_model", "draft"))
    loose: Optional[Loose] = None
    sizes: ClassVar[int] = 3
'''
UTILS = 'class StrictBaseModel(BaseModel):\n    model_config = ConfigDict(extra="forbid")\n'


def upstream_texts(**changes) -> dict:
    texts = {path: None for path in interface.UPSTREAM_PATHS}
    texts[interface.REFERENCE_PATHS["llm_args_models.json"]] = LLM_ARGS
    texts[interface.MODEL_BASES] = UTILS
    texts[interface.REFERENCE_PATHS["trtllm_serve_cli.yaml"]] = PINNED.files["trtllm_serve_cli.yaml"]
    texts.update(changes)
    return texts


def test_written_data_reads_back_as_the_sources_make_it(tmp_path):
    texts = upstream_texts()
    interface.write(tmp_path / "iface", texts, "1.2.3", "a" * 40, "https://example.invalid/trtllm.git")
    loaded, made = interface.load(tmp_path / "iface"), interface.from_sources(texts, "1.2.3", "a" * 40)
    assert (loaded.version, loaded.commit, loaded.repository) == ("1.2.3", "a" * 40,
                                                                  "https://example.invalid/trtllm.git")
    assert loaded.cli.commands == made.cli.commands
    assert loaded.args.models == made.args.models
    assert (tmp_path / "iface" / "trtllm_serve_cli.yaml").read_text() == PINNED.files["trtllm_serve_cli.yaml"]
    assert not (tmp_path / "iface" / "llm.yaml").exists()    # absent upstream: not written
    assert "absent at this commit" in (tmp_path / "iface" / "SOURCES.md").read_text()
    interface.write(tmp_path / "iface", upstream_texts(**{interface.REFERENCE_PATHS["trtllm_serve_cli.yaml"]:
                                                           None}), "1.2.4", "b" * 40, "r")
    assert interface.load(tmp_path / "iface").cli is None   # replaced whole, nothing of the old left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iface"]


def test_the_extractor_reads_fields_bases_extra_enums_and_aliases():
    found = extract.models({"llm_args.py": LLM_ARGS, "utils.py": UTILS}, "llm_args.py")
    torch_args = found["models"]["TorchLlmArgs"]
    assert (torch_args["extra"], sorted(torch_args["fields"])) == (
        "forbid", ["kv_cache_config", "loose", "policy", "speculative_model"])
    assert torch_args["fields"]["speculative_model"]["aliases"] == ["speculative_model", "draft"]
    kv = found["models"]["KvCacheConfig"]
    assert (kv["extra"], kv["fields"]["free_gpu_memory_fraction"]) == (
        "forbid", {"annotation": "Optional[float]", "default": 0.9, "required": False, "ge": 0, "le": 1})
    assert found["models"]["Loose"]["extra"] == "ignore"    # pydantic's default
    assert found["enums"] == {"Policy": ["fcfs"]}
    made = interface.from_sources(upstream_texts(), "1", "c" * 40)
    assert [p.where for p in made.args.validate({"kv_cache_config": {"x": 1}, "loose": {"x": 1},
                                                  "draft": "d", "policy": "lifo"})] == [
        "kv_cache_config.x", "policy"]


@pytest.mark.parametrize("texts, message", [
    ({interface.REFERENCE_PATHS["llm_args_models.json"]: None}, "tensorrt_llm/llmapi/llm_args.py is missing"),
    ({interface.REFERENCE_PATHS["llm_args_models.json"]: "class ("}, "not Python source"),
    ({interface.REFERENCE_PATHS["trtllm_serve_cli.yaml"]: "commands: 3"}, "expected a 'commands' mapping"),
])
def test_unreadable_upstream_texts_say_which_file(texts, message):
    with pytest.raises(interface.InterfaceDataError, match=message):
        interface.from_sources(upstream_texts(**texts), "1", "d" * 40)


def test_a_missing_data_folder_names_the_file(tmp_path):
    with pytest.raises(interface.InterfaceDataError, match="sources.json: missing"):
        interface.load(tmp_path)


def test_the_vllm_table_names_its_version_and_sources():
    data = json.loads((ROOT / vllm_runtime.SERVE_OPTIONS).read_text())
    assert data["version"] and set(vllm_runtime.PARSER_SOURCES) <= set(data["sources"])
    assert data["positionals"][:1] == ["model_tag"]


def vllm_spellings() -> list:
    return [pytest.param(dest, option, flag, id=flag) for dest, option in VLLM.options.items()
            for flag in option["flags"] if option["action"] not in ("version", "help", "count")]


@pytest.mark.parametrize("dest, option, flag", vllm_spellings())
def test_the_stand_in_takes_every_vllm_serve_option(dest, option, flag):
    """Each spelling of serve_options.json, with a value of its kind (vLLM's _ spelling too)."""
    if option["action"] in ("store_true", "store_false", "boolean_optional"):
        words, expected = [], not flag.startswith("--no-") and option["action"] != "store_false"
    elif option.get("choices"):
        words, expected = [option["choices"][-1]], option["choices"][-1]
    else:
        typed, expected = {"int": ("7", 7), "float": ("0.25", 0.25)}.get(option["kind"], ("x", "x"))
        words = [typed]
    if option.get("nargs") in ("+", "*") and words:
        expected = [expected]
    if option["action"] == "append":
        expected = [expected]
    if option.get("choices") and option["kind"] == "int":
        expected = int(expected)
    spelled = flag.replace("-", "_") if flag.startswith("--") else flag
    for written in {flag, "--" + spelled[2:]} if flag.startswith("--") else {flag}:
        args = standin_vllm.parser().parse_args(
            ["serve", "/m", *map(argsource.underscores_to_dashes, [written, *words])])
        assert getattr(args, dest) == expected
