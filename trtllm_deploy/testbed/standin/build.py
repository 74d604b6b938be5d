"""Stand-ins for the tools that make an artifact inside the runtime image.

- ``trtllm-build`` (a TensorRT-LLM checkpoint to TensorRT engines),
- the per-model ``convert_checkpoint.py`` and ``examples/quantization/quantize.py`` of the
  TensorRT backend's examples (a Hugging Face checkpoint to a TensorRT-LLM checkpoint),
- NVIDIA Model Optimizer's ``examples/llm_ptq/hf_ptq.py`` (a Hugging Face checkpoint to a
  quantized Hugging Face checkpoint).

They take the real options trtllm-deploy passes (and refuse unknown ones, exit 2), read what the
real tools read (config.json, the safetensors headers), and write what the real tools write, in
the real layout, so the code around them is tested for real. They compute nothing: every file they
write says it came from the stand-in. ``STANDIN_FAULT=oom`` in the input config's
``"standin_fault"`` key makes them fail the way a real run out of GPU memory does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

from . import VERSION

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")
QUANT_ALGOS = {"fp8": "FP8", "nvfp4": "NVFP4"}
OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total "
       "capacity of 119.70 GiB of which 1.02 GiB is free.")


def _config(directory: Path, name: str = "config.json") -> dict:
    path = directory / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        sys.exit(f"[TRT-LLM] [E] {path} not found")


def _weights_bytes(directory: Path) -> int:
    """The tensor bytes of every safetensors file (from the 8-byte header length and the file size)."""
    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as handle:
            header = struct.unpack("<Q", handle.read(8))[0]
        total += path.stat().st_size - 8 - header
    return total


def _write_safetensors(path: Path, name: str, size: int, note: str) -> None:
    header = json.dumps({"__metadata__": {"format": "pt", "producer": note},
                         name: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        out.write(b"\0" * size)


def _fault(config: dict) -> None:
    if config.get("standin_fault") == "oom":
        sys.stderr.write(f"Traceback (most recent call last):\n{OOM}\n")
        sys.exit(1)


def _say(line: str) -> None:
    print(f"[trtllm-deploy stand-in {VERSION}] {line}", flush=True)


def hf_ptq(argv: list[str]) -> int:
    """``hf_ptq.py --pyt_ckpt_path IN --qformat fp8|nvfp4 --export_path OUT ...``"""
    parser = argparse.ArgumentParser(prog="hf_ptq.py")
    parser.add_argument("--pyt_ckpt_path", "--model", required=True)
    parser.add_argument("--qformat", default="fp8")
    parser.add_argument("--export_path", default="exported_model")
    parser.add_argument("--calib_size", default="512")
    parser.add_argument("--calib_seq", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=0)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--kv_cache_qformat", default="fp8_cast")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--skip_generate", action="store_true")
    args = parser.parse_args(argv)
    if args.qformat not in QUANT_ALGOS:
        parser.error(f"Unsupported quantization format: {args.qformat}")
    source, out = Path(args.pyt_ckpt_path), Path(args.export_path)
    config = _config(source)
    _fault(config)
    weights = _weights_bytes(source)
    _say(f"calibrating on {args.calib_size} samples of {args.dataset or 'the default dataset'}")
    out.mkdir(parents=True, exist_ok=True)
    algo = QUANT_ALGOS[args.qformat]
    kv = None if args.kv_cache_qformat == "none" else "FP8"
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": algo,
                                     "kv_cache_quant_algo": kv, "producer": "trtllm-deploy stand-in"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": f"stand-in {VERSION}"},
        "quantization": {"quant_algo": algo, "kv_cache_quant_algo": kv}}, indent=2))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    ratio = 0.5 if algo == "FP8" else 0.28
    _write_safetensors(out / "model.safetensors", "standin.quantized", max(8, int(weights * ratio)),
                       f"trtllm-deploy stand-in hf_ptq {algo}")
    _say(f"Quantized model exported to {out}")
    return 0


def convert_checkpoint(argv: list[str], quantize: bool = False) -> int:
    """``convert_checkpoint.py`` / ``quantize.py``: ``--model_dir IN --output_dir OUT --tp_size N``."""
    parser = argparse.ArgumentParser(prog="quantize.py" if quantize else "convert_checkpoint.py")
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
    parser.add_argument("--tp_size", type=int, default=1)
    parser.add_argument("--pp_size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    if quantize:
        parser.add_argument("--qformat", required=True, choices=tuple(QUANT_ALGOS))
        parser.add_argument("--kv_cache_dtype", default=None)
        parser.add_argument("--calib_size", type=int, default=512)
    args = parser.parse_args(argv)
    source, out = Path(args.model_dir), Path(args.output_dir)
    config = _config(source)
    _fault(config)
    world = args.tp_size * args.pp_size
    out.mkdir(parents=True, exist_ok=True)
    quant = {"quant_algo": QUANT_ALGOS[args.qformat]} if quantize else {"quant_algo": None}
    (out / "config.json").write_text(json.dumps({
        "architecture": (config.get("architectures") or ["unknown"])[0],
        "dtype": "bfloat16" if args.dtype == "auto" else args.dtype,
        "mapping": {"world_size": world, "tp_size": args.tp_size, "pp_size": args.pp_size},
        "quantization": quant, "producer": "trtllm-deploy stand-in"}, indent=2))
    share = max(8, _weights_bytes(source) // world)
    for rank in range(world):
        _write_safetensors(out / f"rank{rank}.safetensors", f"rank{rank}", share,
                           "trtllm-deploy stand-in convert_checkpoint")
    _say(f"Total time of converting checkpoints: 00:00:00 ({world} rank(s) to {out})")
    return 0


def trtllm_build(argv: list[str]) -> int:
    """``trtllm-build --checkpoint_dir C --output_dir O --gemm_plugin P --max_batch_size B ...``"""
    parser = argparse.ArgumentParser(prog="trtllm-build")
    parser.add_argument("--checkpoint_dir", required=True)
    parser.add_argument("--output_dir", default="engine_outputs")
    parser.add_argument("--gemm_plugin", default="disable")
    parser.add_argument("--max_batch_size", type=int, default=2048)
    parser.add_argument("--max_input_len", type=int, default=1024)
    parser.add_argument("--max_seq_len", type=int, default=None)
    parser.add_argument("--max_num_tokens", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    checkpoint, out = Path(args.checkpoint_dir), Path(args.output_dir)
    config = _config(checkpoint)
    world = config.get("mapping", {}).get("world_size", 1)
    missing = [f"rank{rank}.safetensors" for rank in range(world)
               if not (checkpoint / f"rank{rank}.safetensors").is_file()]
    if missing:
        sys.exit(f"[TRT-LLM] [E] {checkpoint}: missing {', '.join(missing)}")
    if args.max_seq_len is not None and args.max_seq_len < args.max_input_len:
        sys.exit("[TRT-LLM] [E] max_seq_len must not be less than max_input_len")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({
        "version": f"stand-in {VERSION}", "pretrained_config": config,
        "build_config": {"max_batch_size": args.max_batch_size, "max_input_len": args.max_input_len,
                         "max_seq_len": args.max_seq_len, "max_num_tokens": args.max_num_tokens,
                         "plugin_config": {"gemm_plugin": args.gemm_plugin}}}, indent=2))
    for rank in range(world):
        size = (checkpoint / f"rank{rank}.safetensors").stat().st_size
        (out / f"rank{rank}.engine").write_bytes(b"trtllm-deploy stand-in engine\n" + b"\0" * size)
    _say(f"Total time of building all engines: 00:00:00 ({world} engine(s), {args.workers} worker(s))")
    return 0
