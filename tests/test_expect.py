"""invoke expect: ceilings from first principles against what was published and what the plan claimed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from invoke import Context
from invoke.exceptions import Exit

from trtllm_deploy import console
from trtllm_deploy.artifact import models
from trtllm_deploy.cli import expect as cli
from trtllm_deploy.errors import InputError
from trtllm_deploy.measure import expect, hardware

CLAIMS = hardware.load_claims()


def _id(entry) -> str:
    return entry.configuration


@pytest.fixture(scope="module")
def catalog():
    return models.load(None)


@pytest.mark.parametrize("measured", CLAIMS.published, ids=_id)
def test_every_published_measurement_is_at_or_under_its_ceiling(measured, catalog):
    found = expect.ceiling(measured.model, measured.precision, measured.tp, measured.hardware,
                           nodes=measured.nodes, batch=measured.batch, catalog=catalog)
    assert measured.tokens_per_s <= found.decode_tokens_per_s_bound
    # A ceiling far above every measurement would say nothing: the best of them reach a third of it.
    assert found.efficiency(measured.tokens_per_s) > 0.2


def test_the_published_table_is_all_there():
    """docs/SOURCES.md's table has seven rows; the 8B SGLang row gives batch 1 and batch 32."""
    assert len(CLAIMS.published) == 8
    assert {p.source for p in CLAIMS.published} == {
        "NVIDIA blog on DGX Spark performance", "LMSYS review, Oct 2025", "community measurement"}
    assert [p.batch for p in CLAIMS.published].count(32) == 1


@pytest.mark.parametrize("claim", CLAIMS.plan, ids=_id)
def test_the_plans_claims_are_above_their_ceilings_and_flagged(claim, catalog):
    [compared] = [c for c in expect.comparisons(catalog) if c.kind == "plan"
                  and c.configuration == claim.configuration]
    assert compared.above
    assert compared.low > compared.ceiling        # not even the low end of the range is reachable
    assert compared.where == "Performance Expectations / Build from Main Branch"


def test_published_measurements_are_not_flagged(catalog):
    published = [c for c in expect.comparisons(catalog) if c.kind == "published"]
    assert len(published) == 8 and not any(c.above for c in published)


def test_llama_8b_bf16_is_bounded_near_17_tokens_per_s_as_facts_says(catalog):
    found = expect.ceiling("llama-8b", "bf16", 1, catalog=catalog)
    # (16.06 GB of weights less one 1.05 GB embedding table) read per token at 273 GB/s
    assert found.read_per_token_gb == pytest.approx(8.03 * 2 - 128256 * 4096 * 2 / 1e9)
    assert found.decode_tokens_per_s_bound == pytest.approx(273 / found.read_per_token_gb)
    assert 17 <= found.decode_tokens_per_s_bound <= 19
    assert found.allreduces_per_token == 0 and found.allreduce_us_per_token == 0


def test_llama_70b_nvfp4_tp2_by_hand(catalog):
    found = expect.ceiling("llama-70b", "nvfp4", 2, catalog=catalog)
    read = (70.55 * 0.61 - 128256 * 8192 * 2 / 1e9) / 2
    ring = 2 * 1 / 2 * 8192 * 2 / (200e9 / 8) + 2 * 2e-6     # 2(n-1)/n x size / bw + 2(n-1) x latency
    assert found.read_per_token_gb == pytest.approx(read)
    assert found.allreduces_per_token == 160 and found.allreduce_bytes == 16384
    assert found.allreduce_us_per_token == pytest.approx(160 * ring * 1e6)
    assert found.decode_tokens_per_s_bound == pytest.approx(1 / (read / 273 + 160 * ring))
    assert found.decode_tokens_per_s_bound < found.decode_bandwidth_bound
    compute = 70.55e9 - 128256 * 8192
    assert found.prefill_tokens_per_s_bound == pytest.approx(500e12 / (2 * compute / 2))
    assert found.fits and found.weights_per_node_gb == pytest.approx(70.55 * 0.61 / 2)
    assert found.kv_cache_gb > 60 and found.link == "ConnectX-7 200 Gb/s, 2 µs"


def test_measured_fabric_figures_replace_the_nominal_ones(catalog):
    nominal = expect.ceiling("llama-70b", "nvfp4", 2, catalog=catalog)
    slow = expect.ceiling("llama-70b", "nvfp4", 2, catalog=catalog, fabric_gbps=100, fabric_latency_us=20)
    assert slow.allreduce_us_per_token == pytest.approx(160 * (16384 / 12.5e9 + 2 * 20e-6) * 1e6)
    assert slow.decode_tokens_per_s_bound < nominal.decode_tokens_per_s_bound
    assert "measured" in slow.link


def test_a_chip_without_fp4_counts_nvfp4_at_its_fp8_rate(catalog):
    found = expect.ceiling("llama-70b", "nvfp4", 2, "h100-sxm", catalog=catalog)
    assert found.tensor_format == "fp8" and found.tflops == 1979
    assert any("no fp4 tensor cores" in note for note in found.notes)
    assert found.nodes == 1 and found.link.startswith("NVLink")     # 8 GPUs a node: NVLink, not the fabric
    assert found.decode_tokens_per_s_bound > 100


def test_moe_reads_only_the_active_parameters(catalog):
    found = expect.ceiling("gpt-oss-120b", "mxfp4", 1, catalog=catalog)
    assert found.read_per_token_gb == pytest.approx((5.13 - 201088 * 2880 / 1e9) * 0.56)
    assert any("mixture of experts" in note for note in found.notes)


def test_batching_shares_the_weights_up_to_the_compute_bound(catalog):
    one = expect.ceiling("llama-8b", "fp8", 1, catalog=catalog)
    many = expect.ceiling("llama-8b", "fp8", 1, batch=32, catalog=catalog)
    assert many.decode_tokens_per_s_bound == pytest.approx(32 * one.decode_tokens_per_s_bound)
    huge = expect.ceiling("llama-8b", "fp8", 1, batch=100000, catalog=catalog)
    assert huge.decode_tokens_per_s_bound == pytest.approx(huge.prefill_tokens_per_s_bound)


def test_efficiency_is_measured_over_ceiling(catalog):
    found = expect.ceiling("llama-8b", "nvfp4", 1, catalog=catalog)
    assert found.efficiency(found.decode_tokens_per_s_bound / 2) == pytest.approx(0.5)


def _user_file(home: Path, name: str, text: str) -> Path:
    path = home / ".config" / "trtllm-deploy" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_users_hardware_file_is_merged_over_the_table(isolated_ssh_environment, catalog):
    _user_file(isolated_ssh_environment, "hardware.toml", """\
[hardware.gb10]
memory_bandwidth_gbs = 546      # a faster Spark, key by key: the rest stays

[hardware.my-box]
memory_gb = 192
memory_bandwidth_gbs = 800
tflops = { bf16 = 200 }
""")
    table = hardware.load_hardware()
    assert table["gb10"].memory_gb == 128 and table["gb10"].fabric.name == "ConnectX-7"
    base = expect.ceiling("llama-8b", "bf16", 1, catalog=catalog,
                          hardware_table=hardware.load_hardware(Path(hardware.HARDWARE)))
    faster = expect.ceiling("llama-8b", "bf16", 1, catalog=catalog)
    assert faster.decode_tokens_per_s_bound == pytest.approx(2 * base.decode_tokens_per_s_bound)
    mine = expect.ceiling("llama-8b", "nvfp4", 1, "my-box", catalog=catalog)
    assert mine.tensor_format == "bf16" and mine.memory_bandwidth_gbs == 800


@pytest.mark.parametrize("text, expected", [
    ("[hardware.gb10]\nmemory_bandwith_gbs = 300\n",
     [":2: hardware.gb10.memory_bandwith_gbs: unknown key; did you mean 'memory_bandwidth_gbs'?"]),
    ("[hardware.gb10]\ngpus_per_node = 1\n\n[hardware.gb10.fabric]\ngbps = \"fast\"\n",
     [":5: hardware.gb10.fabric.gbps: expected a number, got a string ('fast')",
      "write it like: gbps = 200"]),
    ("[hardware.new]\nmemory_gb = 64\n",
     [":1: hardware.new.memory_bandwidth_gbs: required key is missing",
      "add it: write it like: memory_bandwidth_gbs = 273"]),
    ("[hardware.gb10\n", [":1: not valid TOML"]),
], ids=["misspelt-key", "wrong-type", "missing-key", "bad-toml"])
def test_a_wrong_hardware_file_names_file_line_and_key(tmp_path, text, expected):
    path = tmp_path / "hardware.toml"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        hardware.load_hardware(path)
    assert caught.value.exit_code == 2
    message = str(caught.value)
    for part in expected:
        assert f"{path}{part}" in message or part in message
    assert str(path) in message


def test_a_users_architecture_adds_a_model_and_its_size(tmp_path, catalog):
    path = tmp_path / "architectures.toml"
    path.write_text("[architectures.tiny]\nlayers = 2\nhidden_size = 64\nvocab_size = 100\n"
                    "params_billion = 1.0\nbytes_per_param = { bf16 = 2.0 }\n")
    shapes = hardware.load_architectures(path)
    found = expect.ceiling("tiny", "bf16", 1, catalog=catalog, architectures=shapes)
    assert found.read_per_token_gb == pytest.approx(2.0 - 100 * 64 * 2 / 1e9)
    with pytest.raises(InputError, match="no size at fp8"):
        expect.ceiling("tiny", "fp8", 1, catalog=catalog, architectures=shapes)


def test_unknown_model_and_hardware_are_input_errors(catalog):
    with pytest.raises(InputError, match="did you mean 'llama-70b'"):
        expect.ceiling("llama-7b", "nvfp4", 1, catalog=catalog)
    with pytest.raises(InputError, match="no hardware named 'gb100'.*did you mean 'gb10'"):
        expect.ceiling("llama-8b", "nvfp4", 1, "gb100", catalog=catalog)
    with pytest.raises(InputError, match="needs 2 node"):
        expect.ceiling("llama-70b", "nvfp4", 2, nodes=1, catalog=catalog)


def test_the_task_prints_json_with_the_ceiling_and_the_claims(capsys):
    cli.expect(Context(), model="llama-70b", precision="nvfp4", tp=2, json=True)
    data = json.loads(capsys.readouterr().out)
    assert data["expectation"]["decode_tokens_per_s_bound"] == pytest.approx(13.2, abs=0.1)
    assert {c["configuration"]: c["above"] for c in data["claims"]} == {
        "Llama-70B, TP=2, FP16": True, "Llama-70B, TP=2, FP8": True,
        "Llama-3.1-70B, SGLang, FP8": False}


def test_the_task_prints_tables_and_flags_the_plan(capsys, monkeypatch):
    monkeypatch.setattr(console.out, "width", 200)
    cli.expect(Context(), model="llama-8b", precision="bf16")
    out = capsys.readouterr().out
    assert "decode ceiling" in out and "above the ceiling" in out and "NVIDIA blog" in out


def test_the_task_exits_2_on_a_bad_hardware_file(tmp_path):
    path = tmp_path / "hw.toml"
    path.write_text("[hardware.gb10]\nmemory_gb = -1\n")
    with pytest.raises(Exit) as caught:
        cli.expect(Context(), model="llama-8b", hardware_file=str(path))
    assert caught.value.code == 2 and f"{path}:2: hardware.gb10.memory_gb" in str(caught.value.message)
