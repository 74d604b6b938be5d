"""trtllm-deploy: from bare DGX Spark machines to TensorRT-LLM serving across all of them."""

__version__ = "0.1.0"
