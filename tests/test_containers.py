"""The runtime containers of a job on the testbed: started with each node's own environment,
kept when unchanged, removed everywhere on a failure, and stopped with proof that nothing runs.

Each node gets a fabric interface of its own (``fabN``, a veth pair with a /32 address inside the
node) and RDMA device names of its own, so a rank that saw the head's values would show it.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import docker_unusable
from trtllm_deploy.errors import CheckFailed, InputError
from trtllm_deploy.hosts import inventory
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.hosts.shell import join
from trtllm_deploy.runtimes import runtime
from trtllm_deploy.serving import containers, fabric, mpi, survey
from waiting import until

needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))
JOB = "ctest"


# --- pure: the command lines ---------------------------------------------------------------------

def _node(**fabric) -> inventory.Node:
    return inventory.Node(name="n1", address="192.0.2.1", role="head", fabric=fabric)


SPARK = {"interfaces": ["enp1s0f1np1", "enP2p1s0f1np1"], "rdma_devices": ["rocep1s0f1", "roceP2p1s0f1"]}
SPARK_ENV = {"NCCL_SOCKET_IFNAME": "enp1s0f1np1,enP2p1s0f1np1",
             "GLOO_SOCKET_IFNAME": "enp1s0f1np1,enP2p1s0f1np1",
             "OMPI_MCA_btl_tcp_if_include": "enp1s0f1np1,enP2p1s0f1np1",
             "OMPI_MCA_oob_tcp_if_include": "enp1s0f1np1,enP2p1s0f1np1",
             "NCCL_IB_HCA": "rocep1s0f1,roceP2p1s0f1", "UCX_NET_DEVICES": "rocep1s0f1:1,roceP2p1s0f1:1",
             "TP_SOCKET_IFNAME": "enp1s0f1np1,enP2p1s0f1np1"}
TCP_ENV = {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "OMPI_MCA_btl_tcp_if_include": "eth0",
           "OMPI_MCA_oob_tcp_if_include": "eth0", "UCX_NET_DEVICES": "eth0", "TP_SOCKET_IFNAME": "eth0"}


@pytest.mark.parametrize("serves, fabric_entry, expected", [
    ("trtllm", SPARK, SPARK_ENV),
    ("trtllm", {"interfaces": ["eth0"]}, TCP_ENV),
    ("trtllm", {}, {}),
    # vLLM announces an address: the fabric's, else the node's own (even without a fabric).
    ("vllm", SPARK, {**SPARK_ENV, "VLLM_HOST_IP": "192.0.2.1"}),
    ("vllm", {"interfaces": ["eth0"]}, {**TCP_ENV, "VLLM_HOST_IP": "192.0.2.1"}),
    ("vllm", {}, {"VLLM_HOST_IP": "192.0.2.1"}),
], ids=["spark-two-ports", "tcp-only", "nothing-configured", "vllm-spark-two-ports", "vllm-tcp-only",
        "vllm-nothing-configured"])
def test_fabric_env_is_the_nodes_own_entry_and_its_runtimes(serves, fabric_entry, expected):
    assert fabric.fabric_env(_node(**fabric_entry), runtime.get(serves)) == expected


def _cluster(tmp_path, extra: str = "") -> inventory.Cluster:
    path = tmp_path / "hosts.toml"
    path.write_text('[defaults.container]\nimage = "rt:1"\n'
                    'env = { TRT_LLM_DISABLE_LOAD_WEIGHTS_IN_PARALLEL = "1" }\n'
                    '[[nodes]]\nname = "a"\naddress = "192.0.2.1"\nrole = "head"\n'
                    'fabric = { interfaces = ["ifa"], rdma_devices = ["rdma-a"] }\n'
                    '[[nodes]]\nname = "b"\naddress = "192.0.2.2"\n'
                    'fabric = { interfaces = ["ifb"] }\n' + extra)
    return inventory.load(path)


def _facts(nvidia: bool = False, infiniband: bool = False, image_id: str = "sha256:1") -> survey.Facts:
    return survey.Facts("/home/u", image_id, {}, nvidia, infiniband, None)


def test_run_argv_has_the_serving_flags_mounts_labels_and_the_nodes_env(tmp_path):
    cluster = _cluster(tmp_path)
    head, worker = cluster.nodes
    job = containers.Job(JOB, artifact="llama-8b")
    argv = containers.run_argv(cluster, worker, job, _facts(nvidia=True, infiniband=True))
    line = " ".join(argv)
    assert argv[:5] == ["docker", "run", "--detach", "--name", f"trtllm-deploy-{JOB}"]
    assert argv[-3:] == ["rt:1", "sleep", "infinity"]
    for flag in ("--gpus all", "--init", "--ipc host", "--network host", "--device /dev/infiniband",
                 "--ulimit memlock=-1", "--ulimit stack=67108864",
                 "--env NCCL_SOCKET_IFNAME=ifb", "--env OMPI_MCA_btl_tcp_if_include=ifb",
                 "--env CPATH=/usr/local/cuda/include", "--env NCCL_CUMEM_ENABLE=0",
                 "--env TRITON_PTXAS_PATH=/usr/local/cuda/bin/ptxas",
                 "--env TRT_LLM_DISABLE_LOAD_WEIGHTS_IN_PARALLEL=1",
                 "--env TRTLLM_DEPLOY_IMAGE_ID=sha256:1",
                 "--volume /home/u/trtllm-deploy/engines:/artifacts:ro",
                 "--volume /home/u/.cache/huggingface:/cache/huggingface",
                 f"--volume /home/u/.local/state/trtllm-deploy/jobs/{JOB}/logs:/var/log/trtllm-deploy",
                 f"--volume /home/u/.local/state/trtllm-deploy/jobs/{JOB}/mpi:{mpi.MOUNT}:ro",
                 f"--label io.trtllm-deploy.job={JOB}", "--label io.trtllm-deploy.role=worker",
                 "--label io.trtllm-deploy.artifact=llama-8b", "--label io.trtllm-deploy.image=rt:1"):
        assert flag in line, flag
    assert "rdma-a" not in line and "=ifa" not in line  # nothing of the head's fabric
    assert "NCCL_IB_HCA=rdma-a" in " ".join(containers.run_argv(cluster, head, job, _facts()))
    plain = " ".join(containers.run_argv(cluster, worker, job, _facts()))
    assert "--gpus" not in plain and "/dev/infiniband" not in plain


def test_the_spec_label_changes_with_the_image_behind_the_tag(tmp_path):
    cluster = _cluster(tmp_path)
    job = containers.Job(JOB)

    def spec(image_id: str) -> str:
        argv = containers.run_argv(cluster, cluster.nodes[1], job, _facts(image_id=image_id))
        return containers.spec_of(argv)

    assert spec("sha256:1") == spec("sha256:1") != spec("sha256:2")


def test_mpirun_runs_without_the_per_node_variables_and_every_rank_rereads_its_own(tmp_path):
    cluster = _cluster(tmp_path)
    argv = containers.mpirun_argv(cluster, ["prog"], forward_env=("STANDIN_FAULT",))
    assert argv[0] == "env"
    for name in fabric.FABRIC_VARS:
        assert ["-u", name] == argv[argv.index(name) - 1:argv.index(name) + 1]
    assert "-x" in argv and "STANDIN_FAULT" in argv
    assert argv[-6:] == ["sh", "-c", 'set -a; . "$1"; set +a; shift; exec "$@"', "rank-env",
                         containers.NODE_ENV, "prog"]
    with pytest.raises(InputError, match="NCCL_SOCKET_IFNAME"):
        containers.mpirun_argv(cluster, ["prog"], forward_env=("NCCL_SOCKET_IFNAME",))
    assert fabric.node_env_file(cluster.nodes[1], runtime.get("vllm")) == (
        "NCCL_SOCKET_IFNAME=ifb\nGLOO_SOCKET_IFNAME=ifb\nTP_SOCKET_IFNAME=ifb\n"
        "OMPI_MCA_btl_tcp_if_include=ifb\nOMPI_MCA_oob_tcp_if_include=ifb\nVLLM_HOST_IP=192.0.2.2\n"
        "UCX_NET_DEVICES=ifb\n")
    # TensorRT-LLM's ranks get the fabric only.
    assert "VLLM_HOST_IP" not in fabric.node_env_file(cluster.nodes[1], runtime.get("trtllm"))


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "Bad Name"}, "job name"),
    ({"name": "ok", "env": (("NCCL_SOCKET_IFNAME", "eth0"),)}, "differs per node"),
], ids=["bad-name", "per-node-variable-for-all"])
def test_bad_jobs_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        containers.Job(**kwargs)


def test_container_names_must_agree_across_nodes(tmp_path):
    cluster = _cluster(tmp_path, 'container = { name = "other" }\n')
    with pytest.raises(InputError, match="container.name differs"):
        containers.container_name(cluster, JOB)


# --- on the testbed ------------------------------------------------------------------------------

def authorize_head_key(cluster: inventory.Cluster) -> None:
    """What `invoke ssh.setup` will do: a key made on the head (never copied), trusted by all."""
    head = SSH(cluster.head)
    try:
        head.run(["sh", "-c", "test -f ~/.ssh/id_ed25519 || "
                  "ssh-keygen -q -t ed25519 -N '' -f ~/.ssh/id_ed25519"])
        public = head.run(["cat", ".ssh/id_ed25519.pub"], cwd="~").stdout.strip()
    finally:
        head.close()
    for node in cluster.nodes:
        target = SSH(node)
        try:
            target.run(["sh", "-c", 'grep -qxF "$1" ~/.ssh/authorized_keys || '
                        'echo "$1" >> ~/.ssh/authorized_keys', "sh", public])
        finally:
            target.close()


@pytest.fixture(scope="module")
def fabric_cluster(testbed, tmp_path_factory):
    """The testbed with a fabric interface and RDMA names of each node's own in hosts.toml."""
    bed, _ = testbed
    layout = bed.layout
    text = layout.hosts_file.read_text()
    for index in layout.indexes:
        name = layout.node_name(index)
        address = layout.address(index).rsplit(".", 1)[0] + f".{200 + index}/32"
        subprocess.run(["docker", "exec", layout.container(index), "sh", "-c",
                        f"ip link add fab{index} type veth peer name fab{index}p && ip link set fab{index} up"
                        f" && ip link set fab{index}p up && ip addr add {address} dev fab{index}"],
                       check=True, capture_output=True)
        text = text.replace(f'name = "{name}"\n', f'name = "{name}"\nfabric = {{ interfaces = ["eth0", '
                            f'"fab{index}"], rdma_devices = ["roce{index}"] }}\n')
    path = tmp_path_factory.mktemp("fabric") / "hosts.toml"
    path.write_text(text)
    cluster = inventory.load(path)
    authorize_head_key(cluster)
    try:
        yield cluster
    finally:
        containers.down(cluster, JOB)
        for index in layout.indexes:
            subprocess.run(["docker", "exec", layout.container(index), "ip", "link", "del", f"fab{index}"],
                           capture_output=True)


@pytest.fixture(scope="module")
def started(fabric_cluster, tmp_path_factory):
    result = containers.up(fabric_cluster, containers.Job(JOB), tmp_path_factory.mktemp("up"))
    return result


SHOW_ENV = ('echo "node=$TRTLLM_DEPLOY_NODE host=$(hostname) btl=$OMPI_MCA_btl_tcp_if_include '
            'oob=$OMPI_MCA_oob_tcp_if_include nccl=$NCCL_SOCKET_IFNAME gloo=$GLOO_SOCKET_IFNAME '
            'hca=$NCCL_IB_HCA ucx=$UCX_NET_DEVICES cpath=$CPATH cumem=$NCCL_CUMEM_ENABLE"')


@needs_docker
def test_every_rank_sees_its_own_nodes_fabric_values(fabric_cluster, started):
    assert [o.value.action for o in started] == ["started"] * 3, started.summary()
    inside = containers.enter(fabric_cluster, JOB)
    done = inside.run(containers.mpirun_argv(fabric_cluster, ["sh", "-c", SHOW_ENV]), timeout=120,
                      check=False)
    assert done.ok, done.stderr
    lines = sorted(line.split(":", 1)[1] for line in done.stdout.splitlines() if "node=" in line)
    assert lines == [
        f"node=spark-{i} host=spark-{i} btl=eth0,fab{i} oob=eth0,fab{i} nccl=eth0,fab{i} gloo=eth0,fab{i} "
        f"hca=roce{i} ucx=roce{i}:1 cpath=/usr/local/cuda/include cumem=0" for i in (1, 2, 3)]


@needs_docker
def test_the_agent_socket_is_only_in_the_heads_container_and_no_key_in_any(fabric_cluster, started):
    for node in fabric_cluster.nodes:
        inside = containers.enter(fabric_cluster, JOB, node)
        try:
            listed = inside.run(["ls", "-A", mpi.MOUNT]).stdout.split()
            socket = inside.run(["test", "-S", f"{mpi.MOUNT}/agent.sock"], check=False).ok
            keys = inside.run(["sh", "-c", "grep -rl 'PRIVATE KEY' /run /root /home /etc/ssh 2>/dev/null"],
                              check=False).stdout.split()
            mounts = inside.run(["cat", "/proc/mounts"]).stdout
        finally:
            inside.close()
        assert socket == node.is_head
        assert sorted(set(listed) - {"agent.sock"}) == ["known_hosts", "node.env", "rsh-agent", "ssh_config"]
        assert keys == []
        assert f" {containers.ARTIFACTS} " in mounts and f" {containers.LOGS} " in mounts


@needs_docker
def test_up_again_keeps_what_runs_and_restarts_only_what_is_gone(fabric_cluster, started, tmp_path):
    worker = fabric_cluster.nodes[1]
    target = SSH(worker)
    try:
        target.run(["docker", "rm", "--force", containers.container_name(fabric_cluster, JOB)])
    finally:
        target.close()
    again = containers.up(fabric_cluster, containers.Job(JOB), tmp_path)
    assert {o.node.name: o.value.action for o in again} == {
        "spark-1": "kept", "spark-2": "started", "spark-3": "kept"}
    listed = containers.status(fabric_cluster, JOB)
    assert {o.node.name: [(c.state, c.labels[containers.LABEL_NODE]) for c in o.value] for o in listed} == {
        n.name: [("running", n.name)] for n in fabric_cluster.nodes}


@needs_docker
def test_a_failed_start_on_one_node_leaves_nothing_on_any(fabric_cluster, started, tmp_path):
    # The third node's docker refuses its ulimit: the others were started, and must be removed.
    text = fabric_cluster.source.read_text().replace(
        'name = "spark-3"\n', 'name = "spark-3"\ncontainer = { ulimits = { nofile = "not-a-number" } }\n')
    broken_path = tmp_path / "hosts.toml"
    broken_path.write_text(text)
    broken = inventory.load(broken_path)
    with pytest.raises(CheckFailed, match="spark-3") as caught:
        containers.up(broken, containers.Job(JOB, env=(("CHANGED", "1"),)), tmp_path / "up")
    assert "removed from every node" in str(caught.value)
    for outcome in containers.status(fabric_cluster, JOB):
        assert outcome.value == [], outcome.node.name


@needs_docker
def test_a_head_without_the_key_is_told_by_step_and_remedy_never_by_script(fabric_cluster, tmp_path):
    # What `deploy` meets before `invoke ssh.setup` has made the head's key for mpirun.
    job = containers.Job("ctest-nokey", agent_key="~/.ssh/no-such-key")
    with pytest.raises(CheckFailed) as caught:
        containers.up(fabric_cluster, job, tmp_path)
    message = str(caught.value)
    assert "spark-1: start the head's ssh-agent failed (exit 3)" in message, message
    assert "no-such-key on this node: run invoke ssh.setup" in message, message
    assert "ssh-agent -s" not in message and "set -e" not in message and "sh -c" not in message, message
    for outcome in containers.status(fabric_cluster, job.name):
        assert outcome.value == [], outcome.node.name


def _processes(node: inventory.Node, container: str) -> str:
    target = SSH(node)
    try:
        return target.run(["sh", "-c", 'docker top "$1" -eo args 2>/dev/null; ps -eo args', "sh",
                           container]).stdout
    finally:
        target.close()


@needs_docker
def test_down_removes_the_job_and_proves_nothing_runs(fabric_cluster, tmp_path):
    containers.up(fabric_cluster, containers.Job(JOB), tmp_path)
    inside = containers.enter(fabric_cluster, JOB)
    # A job in flight: mpirun with a rank on every node, left running (the ranks' sleep is the job
    # that `down` must stop).
    inside.run(["sh", "-c", "nohup " + join(containers.mpirun_argv(fabric_cluster, ["sleep", "600"]))
                + " >/dev/null 2>&1 &"], timeout=60)
    # Wait for the job to reach the last node (its orted), instead of sleeping a fixed time.
    name = containers.container_name(fabric_cluster, JOB)
    until(lambda: _processes(fabric_cluster.nodes[2], name), 60, "mpirun's daemon on the last node",
          done=lambda processes: "orted" in processes)
    head = SSH(fabric_cluster.head)
    try:
        pid = head.run(["cat", f".local/state/trtllm-deploy/jobs/{JOB}/agent.pid"], cwd="~").stdout.strip()
        assert head.run(["kill", "-0", pid], check=False).ok
        stopped = containers.down(fabric_cluster, JOB)
        assert {o.node.name: (o.ok, o.value.clean, o.value.removed) for o in stopped} == {
            n.name: (True, True, [containers.container_name(fabric_cluster, JOB)])
            for n in fabric_cluster.nodes}
        assert not head.run(["kill", "-0", pid], check=False).ok  # the agent is gone
    finally:
        head.close()
    for outcome in containers.status(fabric_cluster, JOB):
        assert outcome.value == []
    again = containers.down(fabric_cluster, JOB)  # idempotent
    assert all(o.ok and o.value.clean and o.value.removed == [] for o in again)
