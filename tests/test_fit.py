"""The fit check: numbers and sentences for the presets on one and two DGX Sparks, and its refusals."""

from __future__ import annotations

import pytest

from trtllm_deploy.artifact import fit, models


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> models.Catalog:
    """The presets alone: the developer's own ~/.config/trtllm-deploy/models.toml stays out."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        return models.load()


@pytest.mark.parametrize("name, precision, tp, nodes, fits, per_node, kv, said", [
    pytest.param("llama-70b", "bf16", 2, 2, True, 70.55, 33.2,
                 "llama-70b bf16 needs 141.1 GB of weights; tp=2 puts 70.5 GB on each node — fits",
                 id="llama-70b-bf16-tp2-on-2-sparks-fits"),
    pytest.param("llama-70b", "bf16", 1, 1, False, 141.1, 0.0,
                 "llama-70b bf16 does not fit: tp=1 puts 141.1 GB on one node with 116 GB usable",
                 id="llama-70b-bf16-on-1-spark-refused"),
    pytest.param("llama-70b", "nvfp4", 1, 1, True, 43.0, 55.2,
                 "tp=1 puts 43 GB on one node — fits", id="llama-70b-nvfp4-on-1-spark-fits"),
    pytest.param("gpt-oss-120b", "mxfp4", 1, 1, True, 65.4, 37.3,
                 "gpt-oss-120b mxfp4 needs 65.4 GB of weights; tp=1 puts 65.4 GB on one node — fits",
                 id="gpt-oss-120b-mxfp4-on-1-spark-fits"),
    pytest.param("llama-8b", "nvfp4", 1, 1, True, 6.0, 95.4,
                 "the KV cache gets 95.4 GB (free_gpu_memory_fraction 0.9)", id="llama-8b-nvfp4-kv-at-0.9"),
])
def test_fit_numbers(catalog, name, precision, tp, nodes, fits, per_node, kv, said) -> None:
    result = fit.check(catalog.get(name).variant(precision), tp, fit.gb10_nodes(nodes))
    assert result.fits is fits
    assert result.usable_gb == pytest.approx(116.0)
    assert result.weights_per_node_gb == pytest.approx(per_node, abs=0.05)
    assert result.kv_gb == pytest.approx(kv, abs=0.05)
    assert said in result.sentence, result.sentence


@pytest.mark.parametrize("precision, tp, nodes, smallest, advice", [
    pytest.param("bf16", 1, 2, 2, "; the smallest tp that fits is 2 (needs 2 nodes)",
                 id="tp1-on-2-nodes-suggests-tp2"),
    pytest.param("bf16", 1, 1, 2, "; 1 node is not enough: the smallest tp that fits is 2 (needs 2 nodes)",
                 id="1-node-not-enough"),
    pytest.param("bf16", 2, 1, 2, "tp=2 needs 2 nodes (one GPU each) and 1 node given",
                 id="tp-above-node-count"),
])
def test_refusal_suggests_the_smallest_tp(catalog, precision, tp, nodes, smallest, advice) -> None:
    result = fit.check(catalog.get("llama-70b").variant(precision), tp, fit.gb10_nodes(nodes))
    assert not result.fits and result.smallest_tp == smallest
    assert advice in result.sentence, result.sentence
    with pytest.raises(fit.DoesNotFit) as caught:
        result.require()
    assert caught.value.exit_code == 2 and "what to do:" in str(caught.value)


def test_require_tells_to_pass_the_tp_when_the_nodes_suffice(catalog) -> None:
    with pytest.raises(fit.DoesNotFit, match="what to do: pass --tp 2"):
        fit.check(catalog.get("llama-70b").variant("bf16"), 1, fit.gb10_nodes(2)).require()


def test_even_all_nodes_are_not_enough_on_small_nodes(catalog) -> None:
    small = (fit.NodeMemory("a", 64.0), fit.NodeMemory("b", 64.0))
    result = fit.check(catalog.get("llama-70b").variant("bf16"), 2, small)
    assert not result.fits and result.smallest_tp == 4
    assert ("even all 2 nodes are not enough: the smallest tp that fits is 4 (needs 4 nodes)"
            in result.sentence)


def test_no_tp_fits_says_choose_a_smaller_precision(catalog) -> None:
    tiny = (fit.NodeMemory("a", 24.0),)
    result = fit.check(catalog.get("llama-70b").variant("bf16"), 1, tiny)
    assert result.smallest_tp is None and "choose a smaller precision" in result.sentence


def test_explicit_kv_budget_replaces_the_fraction(catalog) -> None:
    variant = catalog.get("llama-70b").variant("fp8")
    assert fit.check(variant, 1, fit.gb10_nodes(1), kv_gb=30).fits
    refused = fit.check(variant, 1, fit.gb10_nodes(1), kv_gb=50)
    assert not refused.fits and "less than the 50 GB of KV cache asked for" in refused.sentence
    assert refused.smallest_tp == 2


def test_tightest_node_decides(catalog) -> None:
    nodes = (fit.NodeMemory("big", 128.0), fit.NodeMemory("small", 80.0))
    result = fit.check(catalog.get("llama-70b").variant("bf16"), 2, nodes)
    assert result.node == "small" and result.usable_gb == pytest.approx(68.0) and not result.fits


def test_reserve_and_overhead_are_parameters(catalog) -> None:
    variant = catalog.get("llama-70b").variant("bf16")
    result = fit.check(variant, 2, fit.gb10_nodes(2), reserve_gb=20, overhead_gb=10)
    assert result.usable_gb == pytest.approx(108.0) and result.left_gb == pytest.approx(108 - 70.55 - 10)


def test_node_memory_from_meminfo() -> None:
    node = fit.NodeMemory.from_meminfo("spark-1", "MemTotal:       125000000 kB\nMemFree: 1 kB\n")
    assert node.memtotal_gb == pytest.approx(128.0)


def test_as_dict_has_every_number_for_json(catalog) -> None:
    numbers = fit.check(catalog.get("llama-70b").variant(), 1, fit.gb10_nodes(1)).as_dict()
    wanted = {"weights_gb", "weights_per_node_gb", "usable_gb", "kv_gb", "fits", "smallest_tp", "sentence"}
    assert wanted <= set(numbers)
