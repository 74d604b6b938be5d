"""fabric.setup writing its plan into hosts.toml: comments kept, the inventory accepts it, and a
second write of the same plan leaves the file alone."""

from __future__ import annotations

import os

import pytest

from test_fabric_plan import pair, ring
from trtllm_deploy.errors import InputError
from trtllm_deploy.hosts import inventory
from trtllm_deploy.network import plan as planner
from trtllm_deploy.network import write

HOSTS = '''# the lab's Sparks
[cluster]
name = "lab"  # shown in every table

[defaults]
user = "spark"
fabric = { interfaces = ["eth0"] }  # before fabric.setup

[[nodes]]
name = "spark-1"   # the head
address = "10.0.0.1"
role = "head"

[[nodes]]
name = "spark-2"
address = "10.0.0.2"
fabric = { interfaces = ["enp1s0f1np1"] }  # cabled by hand once

[[nodes]]
name = "spark-3"
address = "10.0.0.3"
# the one in the corner
'''


def test_the_plan_goes_into_each_nodes_fabric_table_with_every_comment_kept(tmp_path):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(HOSTS)
    plan = planner.plan(ring())
    assert write.write(hosts, plan) is True
    text = hosts.read_text()
    for comment in ("# the lab's Sparks", "# shown in every table", "# before fabric.setup", "# the head",
                    "# cabled by hand once", "# the one in the corner"):
        assert comment in text
    cluster = inventory.load(hosts)
    planned = {node.node: node for node in plan.nodes}
    for node in cluster.nodes:
        assert node.fabric.interfaces == list(planned[node.name].interfaces)
        assert node.fabric.rdma_devices == list(planned[node.name].rdma_devices)
        assert node.fabric.address == planned[node.name].address
    assert len(cluster.node("spark-1").fabric.interfaces) == 2


def test_writing_the_same_plan_again_leaves_the_file_untouched(tmp_path):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(HOSTS)
    plan = planner.plan(ring())
    write.write(hosts, plan)
    text, stamp = hosts.read_text(), os.stat(hosts).st_mtime_ns
    assert write.write(hosts, plan) is False
    assert hosts.read_text() == text and os.stat(hosts).st_mtime_ns == stamp


def test_a_node_the_file_does_not_list_is_refused_and_the_file_kept(tmp_path):
    hosts = tmp_path / "hosts.toml"
    hosts.write_text(HOSTS.split("[[nodes]]\nname = \"spark-2\"")[0])
    with pytest.raises(InputError, match="no \\[\\[nodes\\]\\] entry named 'spark-2'"):
        write.write(hosts, planner.plan(pair()))
    assert hosts.read_text() == HOSTS.split("[[nodes]]\nname = \"spark-2\"")[0]
