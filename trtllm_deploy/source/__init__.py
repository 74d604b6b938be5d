"""Phase 2: the pinned TensorRT-LLM source (``invoke source.update``, ``invoke source``) and the
image built from it (``invoke image``, ``invoke image.verify``)."""
