"""trtllm-deploy: the phases of bringing DGX Spark machines to TensorRT-LLM serving, in order.

`invoke --list` shows them; each task's logic lives in the trtllm_deploy package.
"""

from invoke import Collection

from trtllm_deploy.cli import (bench, checks, cluster, deploy, diagnose, engine, expect, fabric, hosts, push,
                               serving, smoke, source, ssh, testbed, upstream)

ns = Collection()
ns.add_collection(hosts.ns)          # the inventory: hosts.toml
ns.add_collection(testbed.ns)        # a simulated cluster on this machine, to try all of it on
ns.add_task(checks.preflight)        # phase 1: is every node ready?
ns.add_task(checks.dirs)             # phase 1: the directories every node needs
ns.add_collection(fabric.ns)         # phase 1: the fabric: cabling found, addressed, checked, in hosts.toml
ns.add_collection(source.source_ns)  # phase 2: pin TensorRT-LLM and fetch exactly that commit
ns.add_collection(source.image_ns)   # phase 2: build the image from it, labelled; verify it
ns.add_task(upstream.upstream)       # phase 2: newer releases and main against the lock; the fixes in each
ns.add_collection(engine.ns)         # phases 3-4: the artifact: fit check, build, verify on nodes
ns.add_task(smoke.smoke)             # phase 3: one node serves the small preset and answers
ns.add_task(push.push)               # phase 4: the artifact and image to every node, only what each lacks
ns.add_collection(ssh.ns)            # phase 5: every node reaches every node over SSH; host keys pinned
ns.add_collection(cluster.ns)        # phase 5: mpirun across every node's runtime container; drift stops here
ns.add_task(serving.launch_)         # phase 5: serve across the nodes, gated
ns.add_task(serving.supervise_)      # phase 5: watch every rank; explain, tear down, apply the policy
ns.add_task(serving.status)          # per node: container, ranks; the endpoint's health
ns.add_task(serving.logs)            # every rank's log
ns.add_task(serving.stop)            # stop, verified on every node
ns.add_task(serving.rollback)        # phase 5: the same model with vLLM, health gated
ns.add_task(deploy.deploy)           # every phase in order, each skipped when the facts say it is done
ns.add_task(deploy.demo)             # all of it on a simulated 3-node cluster (the stand-in runtime)
ns.add_collection(bench.ns)          # measure an endpoint (TTFT, ITL, tokens/s); compare, gate regressions
ns.add_task(expect.expect)           # what the hardware allows: ceilings beside claims and published speeds
ns.add_collection(diagnose.ns)       # explain: GPUs, NCCL bandwidth, links, nsys, a bug-report bundle
