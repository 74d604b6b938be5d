"""The fabric plan into hosts.toml: ``[nodes.fabric]`` of each planned node (interfaces, RDMA
devices, address), the user's comments and spelling kept; nothing written when nothing changed.

The result is validated as the inventory (hosts/inventory.py) before it replaces the file, so a
later phase reads exactly what fabric.setup applied: the per-node environment of launch, push's
fabric transport.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import tomlkit
from tomlkit.items import AoT

from trtllm_deploy import atomic
from trtllm_deploy.errors import InputError
from trtllm_deploy.hosts import inventory
from trtllm_deploy.network.model import Plan


def _fabric(node) -> dict:
    return {"interfaces": list(node.interfaces), "rdma_devices": list(node.rdma_devices),
            "address": node.address}


def updated(text: str, plan: Plan, source: Path) -> str:
    """``text`` (hosts.toml) with each planned node's fabric table set to the plan."""
    document = tomlkit.parse(text)
    entries = document.get("nodes")
    if not isinstance(entries, AoT):
        raise InputError(f"{source}: no [[nodes]] tables to write the fabric into")
    by_name = {str(entry.get("name")): entry for entry in entries}
    for node in plan.nodes:
        entry = by_name.get(node.node)
        if entry is None:
            raise InputError(f"{source}: no [[nodes]] entry named {node.node!r}"
                             " (did it change while fabric.setup ran?)")
        wanted = _fabric(node)
        fabric = entry.get("fabric")
        if fabric is None:
            table = tomlkit.table()
            table.comment("written by `invoke fabric.setup`")
            for key, value in wanted.items():
                table[key] = value
            table.add(tomlkit.nl())  # a blank line before the next [[nodes]]
            entry["fabric"] = table
            continue
        for key, value in wanted.items():  # an inline table is set key by key too
            if fabric.get(key) != value:
                fabric[key] = value
    return document.as_string()


def write(path: str | os.PathLike, plan: Plan) -> bool:
    """Write the plan into the inventory at ``path``; False (file untouched) when it already says so."""
    source = Path(path)
    text = source.read_text()
    new = updated(text, plan, source)
    if new == text:
        return False
    with tempfile.TemporaryDirectory() as scratch:  # the result must load as an inventory
        candidate = Path(scratch) / source.name
        candidate.write_text(new)
        inventory.load(candidate)
    atomic.write_text(source, new)
    return True
