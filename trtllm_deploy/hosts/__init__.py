"""The hosts layer: the inventory, the one way to act on a host (local, SSH, in a container),
quoting, facts and their parsers, fan-out over nodes, and SSH trust between nodes."""
