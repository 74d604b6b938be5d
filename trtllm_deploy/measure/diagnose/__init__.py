"""``invoke diagnose.*``: what the GPUs, the collectives and the links actually do, and one archive
of it all for a bug report. Parsing is pure and tested against recorded real outputs
(tests/data/diagnostics/); the modules that only parse import nothing beyond the standard library,
so they also run on a plain GPU host without the project's dependencies."""
