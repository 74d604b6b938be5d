"""The measuring layer: the benchmark client, the first-principles ceilings (expect) and the
diagnostics."""
