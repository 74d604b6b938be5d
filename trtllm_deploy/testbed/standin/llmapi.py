"""The LLM-API options file (``--config`` / ``--extra_llm_api_options``), refused as TensorRT-LLM refuses it.

TensorRT-LLM validates the YAML with pydantic models that forbid unknown keys, so a misspelt key
stops the server. The stand-in knows the common top-level keys of ``TorchLlmArgs`` (from
TensorRT-LLM's API reference and its ``tests/unittest/api_stability`` references) and reports
unknown ones in pydantic's layout. A real key missing here is a stand-in bug: add it to
KNOWN_OPTIONS.
"""

from __future__ import annotations

from pathlib import Path

import yaml

KNOWN_OPTIONS = frozenset({
    # model, tokenizer and parallelism
    "model", "tokenizer", "tokenizer_mode", "custom_tokenizer", "skip_tokenizer_init", "trust_remote_code",
    "tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size", "gpus_per_node",
    "moe_cluster_parallel_size", "moe_tensor_parallel_size", "moe_expert_parallel_size",
    "enable_attention_dp", "attention_dp_config", "cp_config", "pp_partition", "dtype", "revision",
    "tokenizer_revision", "load_format", "checkpoint_format", "checkpoint_loader", "quant_config",
    # limits
    "max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len", "max_beam_width",
    # runtime configuration
    "backend", "build_config", "kv_cache_config", "cuda_graph_config", "moe_config", "scheduler_config",
    "peft_cache_config", "cache_transceiver_config", "speculative_config", "lora_config", "enable_lora",
    "torch_compile_config", "batching_type", "attn_backend", "sampler_type", "allreduce_strategy",
    "disable_overlap_scheduler", "enable_chunked_prefill", "enable_autotuner", "enable_min_latency",
    "enable_mixed_sampler", "enable_trtllm_sampler", "kv_cache_dtype", "force_dynamic_quantization",
    "guided_decoding_backend", "stream_interval", "garbage_collection_gen0_threshold",
    "num_postprocess_workers", "postprocess_tokenizer_dir", "reasoning_parser", "normalize_log_probs",
    "gather_generation_logits", "fail_fast_on_attention_window_too_large", "otlp_traces_endpoint",
    "return_perf_metrics",
    # logging and statistics
    "print_iter_log", "enable_iter_perf_stats", "enable_iter_req_stats", "iter_stats_max_iterations",
    "request_stats_max_iterations", "enable_layerwise_nvtx_marker",
})
POSITIVE_INTEGERS = ("max_batch_size", "max_num_tokens", "max_seq_len", "max_beam_width",
                     "tensor_parallel_size", "pipeline_parallel_size", "moe_expert_parallel_size")
BOOLEANS = ("enable_attention_dp", "disable_overlap_scheduler", "print_iter_log", "trust_remote_code",
            "enable_chunked_prefill")
# TensorRT-LLM's BaseCudaGraphConfig / DecodeCudaGraphConfig fields (tensorrt_llm/llmapi/llm_args.py).
CUDA_GRAPH_KEYS = frozenset({"batch_sizes", "max_batch_size", "enable_padding", "mode"})


class OptionsError(ValueError):
    """The file cannot be used; the message is what the real server would print for it."""


def load(path: str | Path, backend: str = "pytorch") -> dict:
    """Read and check the options file; return its top-level mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise OptionsError(f"cannot read the LLM-API options file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise OptionsError(f"{path} is not valid YAML: {error}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise OptionsError(f"{path} must hold a mapping of LLM-API options, not {type(data).__name__}")
    errors = list(_errors(data))
    if errors:
        model = "TrtLlmArgs" if backend == "tensorrt" else "TorchLlmArgs"
        count = f"{len(errors)} validation error{'s' if len(errors) > 1 else ''}"
        lines = [f"{count} for {model}"]
        for location, message, kind, value in errors:
            lines += [location, f"  {message} [type={kind}, input_value={value!r}, "
                                f"input_type={type(value).__name__}]"]
        raise OptionsError("\n".join(lines))
    return data


def _errors(data: dict):
    for key, value in data.items():
        if key not in KNOWN_OPTIONS:
            yield str(key), "Extra inputs are not permitted", "extra_forbidden", value
    for key in POSITIVE_INTEGERS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            yield key, "Input should be a valid integer", "int_type", value
        elif value is not None and value < 1:
            yield key, "Input should be greater than 0", "greater_than", value
    for key in BOOLEANS:
        if key in data and not isinstance(data[key], bool):
            yield key, "Input should be a valid boolean", "bool_type", data[key]
    kv_cache = data.get("kv_cache_config")
    if kv_cache is not None and not isinstance(kv_cache, dict):
        yield "kv_cache_config", "Input should be a valid dictionary", "dict_type", kv_cache
    elif kv_cache is not None and "free_gpu_memory_fraction" in kv_cache:
        fraction = kv_cache["free_gpu_memory_fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            yield ("kv_cache_config.free_gpu_memory_fraction", "Input should be a number from 0 to 1",
                   "value_error", fraction)
    graphs = data.get("cuda_graph_config")
    if graphs is not None and not isinstance(graphs, dict):
        yield "cuda_graph_config", "Input should be a valid dictionary", "dict_type", graphs
    elif graphs is not None:
        for key in sorted(set(graphs) - CUDA_GRAPH_KEYS, key=str):
            yield f"cuda_graph_config.{key}", "Extra inputs are not permitted", "extra_forbidden", graphs[key]
