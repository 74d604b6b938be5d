"""The runtimes layer: what each serving runtime is, as data (runtime.py, one module per runtime),
and the known ways it fails."""
