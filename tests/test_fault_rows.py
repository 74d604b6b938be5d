"""The rows of docs/FAULTS.md that no other test showed: a GPU lost to its driver mid-serving (the
stand-in printing PyTorch's CUDA error and exiting, explained by runtimes/failures.toml), and mpirun
killed under a serving job on the testbed."""

from __future__ import annotations

import pytest

from conftest import docker_unusable
from test_launch import bed, deployment, home, running_anywhere  # noqa: F401  (fixtures)
from test_standin import checkpoint, start_server  # noqa: F401  (fixtures)
from test_supervise import long_streams
from trtllm_deploy.hosts.ssh import SSH
from trtllm_deploy.runtimes import failures
from trtllm_deploy.serving import jobs, launch, state, supervise
from trtllm_deploy.testbed.standin import faults

needs_docker = pytest.mark.skipif(docker_unusable() is not None, reason=str(docker_unusable()))


@pytest.mark.parametrize("runtime", ["trtllm", "vllm"])
def test_a_gpu_lost_to_its_driver_is_found_at_the_next_look_and_named_with_its_remedy(
        runtime, checkpoint, start_server):  # noqa: F811
    program = (["trtllm-serve", str(checkpoint), "--tp_size", "2"] if runtime == "trtllm" else
               ["vllm", "serve", str(checkpoint), "--tensor-parallel-size", "2"])
    server = start_server(*program, env={"STANDIN_TOKENS_PER_S": "20", "STANDIN_FAULT": "driver:3@1"})
    server.wait_ready()
    long_streams(server.port, 1, 20)
    server.wait_for_line("STANDIN_FAULT driver:3@1")
    alive = lambda: None if server.process.poll() is None else "rank-1 on here died"  # noqa: E731
    # The dead process's whole log, as the supervisor reads a dead rank's log file: its last lines may
    # still be in the pipe when the process is seen dead.
    explain = lambda what: failures.explain(what, server.whole_output(), runtime=runtime)  # noqa: E731
    failure = supervise.observe(alive, lambda: supervise.Seen(None, 0, 0.0), explain, interval=1.0,
                                hang_s=8.0, duration=30)
    assert server.wait_exit() == 1
    assert faults.DRIVER_LINE in server.output   # the real runtime's line, printed by the rank
    assert failure is not None and failure.kind == "dead", failure
    assert "the GPU stopped answering its driver" in failure.explanation
    assert "what to do: look on the node for the driver's Xid line" in failure.explanation
    # The rank had printed its line (and was exiting) when the watch began: one interval at most.
    assert failure.looks <= 2, failure


@needs_docker
def test_a_killed_mpirun_is_found_within_two_looks_and_stop_leaves_nothing(bed, home):  # noqa: F811
    wanted = deployment(bed, job="tbmpi", port=8369)
    launch.launch(bed, wanted, home / "tmp")
    try:
        head = SSH(bed.head)
        name = "trtllm-deploy-tbmpi"
        # mpirun is the child of the wrapper whose pid launch recorded (launch.MPIRUN_WRAPPER).
        found = head.run(["docker", "exec", name, "sh", "-c",
                          'w=$(cat "$TRTLLM_DEPLOY_LOG_DIR/mpirun.pid"); for c in '
                          '$(cat /proc/$w/task/$w/children); do echo "$c $(cat /proc/$c/comm)"; done'])
        [(pid, comm)] = [line.split() for line in found.stdout.splitlines()]
        assert comm in ("mpirun", "orterun", "prterun"), comm
        head.run(["docker", "exec", name, "kill", "-9", pid])
        head.close()
        failure = supervise.watch(bed, state.current(bed), interval=1.0, duration=30)
        assert failure is not None and failure.kind == "dead", failure
        assert failure.looks <= 2, failure
        assert "mpirun exited with status" in failure.what or " died" in failure.what, failure.what
        # Whichever was seen first, the head recorded mpirun's end as the SIGKILL it was.
        assert jobs.look(bed, state.current(bed))[bed.head.name].mpirun_exit == 128 + 9
        handled = supervise.handle(bed, state.current(bed), failure, "stop", home / "tmp2")
        assert handled.stopped and handled.relaunched is None
    finally:
        launch.stop(bed, "tbmpi")
    assert running_anywhere(bed, "tbmpi") == []
