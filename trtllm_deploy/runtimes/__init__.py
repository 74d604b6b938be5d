"""The runtimes layer: what each serving runtime (TensorRT-LLM, vLLM) is, as data, and the
known ways it fails."""
