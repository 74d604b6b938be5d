"""models.toml: the presets are valid, a user file merges over them, every bad entry is pointed at."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trtllm_deploy.artifact import models
from trtllm_deploy.errors import InputError


@pytest.fixture(autouse=True)
def no_user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own ~/.config/trtllm-deploy/models.toml stays out of the tests."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def user_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_presets_load_with_every_required_model_and_their_spark_settings() -> None:
    catalog = models.load()
    assert {"llama-8b", "llama-70b", "qwen3-32b", "gpt-oss-120b"} <= set(catalog.models)
    for model in catalog.models.values():
        assert model.variant().precision == model.default_precision
        for variant in model.variants.values():
            assert variant.revision is None or re.fullmatch(r"[0-9a-f]{40}", variant.revision)
            assert variant.settings["cuda_graph_config"] == {"enable_padding": True}
            assert variant.settings["print_iter_log"] is False
            assert variant.llm_api(1)["disable_overlap_scheduler"] is True
            assert "disable_overlap_scheduler" not in variant.llm_api(2)
    assert catalog.get("gpt-oss-120b").variant().llm_api(2)["moe_config"] == {"backend": "CUTLASS"}
    assert catalog.get("llama-70b").variant().kv_fraction == 0.8
    assert catalog.get("llama-8b").variant().kv_fraction == 0.9


@pytest.mark.parametrize("name, precision, weights_gb", [
    pytest.param("llama-70b", "bf16", 141.1, id="llama-70b-bf16-is-141GB"),
    pytest.param("llama-8b", "bf16", 16.1, id="llama-8b-bf16-is-16GB"),
    pytest.param("gpt-oss-120b", "mxfp4", 65.4, id="gpt-oss-120b-mxfp4-is-the-65GB-checkpoint"),
])
def test_preset_weights(name: str, precision: str, weights_gb: float) -> None:
    assert models.load().get(name).variant(precision).weights_gb == pytest.approx(weights_gb, abs=0.1)


def test_unpinned_variant_says_engine_build_resolves_it() -> None:
    variant = models.load().get("llama-70b").variant("nvfp4")
    assert not variant.pinned and variant.revision_text == models.UNPINNED


@pytest.mark.parametrize("call, said", [
    pytest.param(lambda c: c.get("lama-70b"), "no model named 'lama-70b' (did you mean 'llama-70b'?)",
                 id="unknown-model-did-you-mean"),
    pytest.param(lambda c: c.get("llama-70b").variant("fp4"), "no 'fp4' variant (did you mean 'nvfp4'?)",
                 id="unknown-precision-did-you-mean"),
    pytest.param(lambda c: c.get("gpt-oss-120b").variant("bf16"), "its precisions are: mxfp4",
                 id="precision-the-model-lacks-lists-the-known-ones"),
])
def test_unknown_name_or_precision_is_input_error(call, said: str) -> None:
    with pytest.raises(InputError) as caught:
        call(models.load())
    assert said in str(caught.value) and caught.value.exit_code == 2
    assert "what to do:" in str(caught.value)


def test_precision_is_case_insensitive() -> None:
    assert models.load().get("llama-70b").variant("NVFP4").precision == "nvfp4"


def test_user_file_overrides_one_key_and_adds_a_variant_and_a_model(tmp_path: Path) -> None:
    path = user_file(tmp_path, """\
[models.llama-70b]
default_precision = "fp8"

[models.llama-70b.variants.nvfp4]
revision = "0123456789abcdef0123456789abcdef01234567"

[models.qwen3-32b.variants.fp16]
repo = "me/Qwen3-32B-fp16"
bytes_per_param = 2
tp_by_nodes = { 2 = 2 }

[models.mine]
params_billion = 14
default_precision = "bf16"
[models.mine.llm_api]
kv_cache_config = { free_gpu_memory_fraction = 0.7 }
[models.mine.variants.bf16]
repo = "me/mine"
bytes_per_param = 2
tp_by_nodes = { 1 = 1 }
""")
    catalog = models.load(path)
    llama = catalog.get("llama-70b")
    assert llama.variant().precision == "fp8"
    assert llama.variant("nvfp4").revision == "0123456789abcdef0123456789abcdef01234567"
    assert llama.variant("nvfp4").repo == "nvidia/Llama-3.3-70B-Instruct-FP4"  # the rest is the preset's
    assert catalog.get("qwen3-32b").variant("fp16").recommended_tp(4) == 2
    mine = catalog.get("mine").variant()
    assert mine.kv_fraction == 0.7 and mine.settings["print_iter_log"] is False
    assert catalog.sources == (models.PRESETS, path)


def test_default_user_file_is_read_when_it_exists(tmp_path: Path) -> None:
    config = tmp_path / "home" / ".config" / "trtllm-deploy"
    config.mkdir(parents=True)
    (config / "models.toml").write_text('[models.llama-8b]\ndefault_precision = "fp8"\n')
    assert models.load().get("llama-8b").variant().precision == "fp8"


def test_recommended_tp_takes_the_largest_listed_node_count_not_above() -> None:
    variant = models.load().get("llama-70b").variant("bf16")
    assert [variant.recommended_tp(n) for n in (1, 2, 3)] == [None, 2, 2]


@pytest.mark.parametrize("text, line, key, said, remedy", [
    pytest.param('[models.llama-70b.variants.nvfp4]\nrevision = "main"\n', 2,
                 "models.llama-70b.variants.nvfp4.revision", "full 40-hex commit", "revision = ",
                 id="branch-as-revision"),
    pytest.param('[models.llama-70b.variants.nvfp4]\nrevision = "6f6073b"\n', 2,
                 "models.llama-70b.variants.nvfp4.revision", "not a branch, tag or short hash", "revision = ",
                 id="short-hash-as-revision"),
    pytest.param('[models.llama-70b.variants.nvfp4]\nrepo = "Llama-3.3-70B"\n', 2,
                 "models.llama-70b.variants.nvfp4.repo", "owner/name", 'repo = "nvidia/',
                 id="repo-without-owner"),
    pytest.param('[models.llama-70b.variants.nvfp4]\nbytes_per_param = "0.6"\n', 2,
                 "models.llama-70b.variants.nvfp4.bytes_per_param", "expected", "bytes_per_param = 0.61",
                 id="number-as-string"),
    pytest.param('[models.llama-70b.variants.nvfp4]\nbytes_per_param = 0\n', 2,
                 "models.llama-70b.variants.nvfp4.bytes_per_param", "greater than 0", "bytes_per_param",
                 id="zero-bytes-per-param"),
    pytest.param('[models.llama-70b.variants.nvfp4]\nrevison = "x"\n', 2,
                 "models.llama-70b.variants.nvfp4.revison", "did you mean 'revision'?", "rename or remove",
                 id="misspelt-key"),
    pytest.param('[models.llama-70b]\n\ndefault_precision = "fp4"\n', 3,
                 "models.llama-70b.default_precision", "did you mean 'nvfp4'?", "use one of",
                 id="unknown-default-precision"),
    pytest.param('[models.llama-70b]\ndefault_precision = "fp16"\n', 2,
                 "models.llama-70b.default_precision", "not one of this model's variants",
                 "name one of its variants", id="default-precision-without-variant"),
    pytest.param('[models.x]\nparams_billion = 1\ndefault_precision = "bf16"\n'
                 '[models.x.variants.bf16]\nbytes_per_param = 2\ntp_by_nodes = { 1 = 1 }\n', 4,
                 "models.x.variants.bf16", "exactly one of repo", 'repo = "owner/name"',
                 id="variant-without-repo"),
    pytest.param('[models.x]\nparams_billion = 1\ndefault_precision = "bf16"\n'
                 '[models.x.variants.bf16]\nrepo = "o/x"\nbytes_per_param = 2\ntp_by_nodes = { 1 = 1 }\n'
                 '[models.x.variants.nvfp4]\nquantize_from = "fp16"\nbytes_per_param = 0.6\n'
                 'tp_by_nodes = { 1 = 1 }\n', 9, "models.x.variants.nvfp4.quantize_from",
                 "not a published 16-bit variant", "name its bf16 or fp16 variant (one with a repo): bf16",
                 id="quantize-from-a-missing-variant"),
    pytest.param('[models.x]\nparams_billion = 1\ndefault_precision = "bf16"\n'
                 '[models.x.variants.bf16]\nrepo = "o/x"\nbytes_per_param = 2\ntp_by_nodes = { 1 = 1 }\n'
                 '[models.x.variants.mxfp4]\nquantize_from = "bf16"\nbytes_per_param = 0.6\n'
                 'tp_by_nodes = { 1 = 1 }\n', 9, "models.x.variants.mxfp4.quantize_from",
                 "mxfp4 is not made by quantizing here", "only fp8, nvfp4", id="quantize-to-mxfp4"),
    pytest.param('[models.llama-70b.variants.fp8]\ntp_by_nodes = { 1 = 2 }\n', 2,
                 "models.llama-70b.variants.fp8.tp_by_nodes", "tp cannot exceed the node count",
                 "use at most tp 1", id="tp-above-node-count"),
    pytest.param('[models.llama-70b.variants.fp8]\ntp_by_nodes = { one = 1 }\n', 2,
                 "models.llama-70b.variants.fp8.tp_by_nodes.one", "node count from 1 to 64",
                 "tp_by_nodes = {",
                 id="tp-keyed-by-a-word"),
    pytest.param('[models.llama-70b.variants.fp4]\nrepo = "a/b"\n', 1,
                 "models.llama-70b.variants.fp4", "did you mean 'nvfp4'?", "use one of",
                 id="unknown-precision-as-variant"),
    pytest.param('[models.llama-70b.llm_api]\nkv_cache_config = { free_gpu_memory_fraction = 1.5 }\n', 2,
                 "models.llama-70b.llm_api.kv_cache_config.free_gpu_memory_fraction",
                 "less than or equal to 1",
                 "free_gpu_memory_fraction = 0.9", id="kv-fraction-above-one"),
    pytest.param('[models.Llama_70B]\nparams_billion = 1\n', 1,
                 "models.Llama_70B", "lower-case letters", "correct the value", id="bad-model-name"),
])
def test_bad_user_entry_names_file_line_key_and_remedy(tmp_path: Path, text: str, line: int, key: str,
                                                      said: str, remedy: str) -> None:
    path = user_file(tmp_path, text)
    with pytest.raises(models.ModelsFileError) as caught:
        models.load(path)
    message = str(caught.value)
    assert caught.value.exit_code == 2
    assert f"{path}:{line}: {key}: " in message, message
    assert said in message, message
    todo = [row for row in message.splitlines() if row.strip().startswith("what to do:")]
    assert any(remedy in row for row in todo), message


def test_missing_user_file_given_explicitly_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(models.ModelsFileError, match="file not found"):
        models.load(tmp_path / "nope.toml")


def test_invalid_toml_points_at_its_line(tmp_path: Path) -> None:
    path = user_file(tmp_path, "[models.x]\nparams_billion = = 1\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}:2: not valid TOML"):
        models.load(path)


def test_broken_presets_are_reported_against_the_presets_file(tmp_path: Path) -> None:
    presets = tmp_path / "presets.toml"
    presets.write_text('[models.a]\nparams_billion = 1\ndefault_precision = "bf16"\n')
    with pytest.raises(models.ModelsFileError, match=rf"{re.escape(str(presets))}:1: models.a.variants"):
        models.load(presets=presets)


def test_a_quantize_from_variant_downloads_its_source_checkpoint(tmp_path: Path) -> None:
    path = user_file(tmp_path, '[models.llama-8b.variants.nvfp4]\nquantize_from = "bf16"\n'
                               'repo = "nvidia/Llama-3.1-8B-Instruct-FP4"\n')
    with pytest.raises(models.ModelsFileError, match="exactly one of repo"):
        models.load(path)
    path.write_text('[models.mine]\nparams_billion = 8\ndefault_precision = "nvfp4"\n'
                    '[models.mine.variants.bf16]\nrepo = "o/mine"\nrevision = "' + "a" * 40 + '"\n'
                    'bytes_per_param = 2\ntp_by_nodes = { 1 = 1 }\n'
                    '[models.mine.variants.nvfp4]\nquantize_from = "bf16"\nbytes_per_param = 0.7\n'
                    'tp_by_nodes = { 1 = 1 }\n')
    variant = models.load(path).get("mine").variant()
    assert (variant.precision, variant.quantize_from, variant.repo, variant.revision) == \
        ("nvfp4", "bf16", "o/mine", "a" * 40)
    assert variant.weights_gb == pytest.approx(8 * 0.7)


def test_quantize_makes_a_published_precision_from_the_16_bit_checkpoint() -> None:
    model = models.load(None, presets=models.PRESETS).get("llama-8b")
    published = model.variant("nvfp4")
    made = model.variant("nvfp4", quantize=True)
    bf16 = model.variant("bf16")
    assert published.quantize_from is None and published.repo != bf16.repo
    assert (made.quantize_from, made.repo, made.revision) == ("bf16", bf16.repo, bf16.revision)
    assert made.bytes_per_param == published.bytes_per_param  # the published size is the estimate
    with pytest.raises(InputError, match="makes fp8 or nvfp4"):
        model.variant("bf16", quantize=True)
