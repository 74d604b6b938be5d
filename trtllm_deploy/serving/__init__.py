"""The serving layer: runtime containers, mpirun, launch and its gate, the cluster check,
supervision, the smoke test and the whole deployment."""
