"""The testbed: several simulated nodes on this machine (real sshd, Docker, mpirun), and the images
they run. The same code serves `invoke testbed.*` and the test suite's fixtures."""
