"""A tiny artifact for the testbed's smoke run: the shape engine.build makes (a config, safetensors
weights, the LLM-API YAML, the manifest), with a few KB of weights the stand-in never computes with.

``python -m trtllm_deploy.testbed.artifact DIR`` writes one into DIR.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import yaml

from trtllm_deploy.artifact import manifest


def make(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}, indent=1))
    tensor = bytes(range(256)) * 16  # 4096 bytes: one 64x32 BF16 tensor
    header = json.dumps({"embed.weight": {"dtype": "BF16", "shape": [64, 32],
                                          "data_offsets": [0, len(tensor)]}}).encode()
    header += b" " * (-len(header) % 8)  # the format pads its header to 8 bytes
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + tensor)
    (folder / "llm-api.yaml").write_text(yaml.safe_dump({
        "kv_cache_config": {"free_gpu_memory_fraction": 0.9}, "print_iter_log": False}))
    manifest.write(folder, manifest.create(folder, {"model": "testbed-tiny", "precision": "bf16",
                                                    "tp": 1, "backend": "pytorch"}))
    return folder


if __name__ == "__main__":
    print(make(Path(sys.argv[1])))
