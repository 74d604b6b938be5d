"""A stand-in for ``trtllm-serve`` and the other runtimes' servers: same command line, same HTTP
surface, no GPU.

It is a test double, never inference. It says so in ``--version``, in every log line
(``[TensorRT-LLM stand-in][rank N][LEVEL] ...``), in ``/v1/models`` (``"standin": true``) and in the
``model`` field of every response. It imports nothing else from ``trtllm_deploy`` but the
manifest verifier (``trtllm_deploy/artifact/manifest.py``, standard library only): the container image holds
this subpackage and that file (standard library, ``mpi4py`` and PyYAML).

Executables (one program, chosen by the basename of ``argv[0]``, or by the first argument of
``python -m trtllm_deploy.testbed.standin``):

``trtllm-serve [serve] MODEL [options]``
    trtllm-serve's own option names (``--tp_size``, ``--config``/``--extra_llm_api_options``, ...);
    unknown options are refused the way click refuses them (exit status 2).
``trtllm-llmapi-launch CMD ARGS...``
    The wrapper used under ``mpirun``: rank 0 runs ``CMD`` (marked with
    ``TLLM_SPAWN_PROXY_PROCESS=1``, as the real wrapper does); every other rank joins as a worker
    and takes its whole configuration from rank 0. A multi-rank ``trtllm-serve`` refuses to start
    without it.
``trtllm-build``, ``convert_checkpoint.py``, ``quantize.py``, ``hf_ptq.py``
    The artifact-making tools (see ``build.py``): real options, real output layout, no computing.
The other runtimes' programs (one module each, naming its ``PROGRAM``)
    The same runtime behind their command lines.

Under ``mpirun`` the world size must equal ``tp_size * pp_size``. Rank 0 serves HTTP; every
generated token is one collective over all ranks (each rank adds a partial "logit" hashed from
prompt, position and rank; an allreduce sums them into the token), so a dead or stopped rank fails
or stalls serving. Without ``mpirun`` one process adds the partials of all ``tp_size * pp_size``
ranks itself, so the same prompt gives the same text either way.

Before "loading", every rank checks its own copy of MODEL: a directory with a parseable
``config.json`` and at least one ``*.safetensors`` file (``rank*.engine`` for
``--backend tensorrt``); where ``trtllm-deploy-manifest.json`` exists, the tree must match it as
``trtllm_deploy.artifact.manifest.check`` sees it (no file missing, extra, resized or changed). The HTTP
port is bound only once loading has finished.

Output is deterministic for a prompt and ``max_tokens``: words of a fixed vocabulary. Sampling
fields (``temperature``, ``top_p``, ``seed``, ``stop``, ...) are accepted and ignored.

Environment (read on rank 0 only and broadcast, so ``mpirun -x`` is not needed):

``STANDIN_TOKENS_PER_S``  engine steps per second; each step gives every active request one
                          token (default 100).
``STANDIN_LOAD_SECONDS``  how long "loading weights" takes (default 2).
``STANDIN_LOAD_STEPS``    how many ``Loading weights: i/n shards`` lines it prints (default 4).
``STANDIN_FAULT``         faults to inject, comma-separated ``KIND[:TOKEN][@RANK]``:

    ``exit:K@R``        rank R exits with status 1 instead of computing token K
    ``hang:K@R``        rank R stops taking part at token K and stays alive (SIGTERM kills it)
    ``nccl:K@R``        rank R prints a real NCCL error line and exits 1 at token K
    ``double-free:K@R`` rank R prints glibc's double-free line and aborts (SIGABRT) at token K
    ``driver:K@R``      rank R prints PyTorch's CUDA error of a GPU lost to its driver, exits 1
    ``oom@R``           rank R prints a real CUDA out-of-memory line half-way through loading
    ``bind``            rank 0 fails to bind its port with uvicorn's bind error line, exit 1

    ``@R`` defaults to rank 0. Tokens are counted over the server's life, all requests together,
    from 1. Without ``:K``, ``exit`` and ``hang`` fire half-way through loading, ``nccl`` and
    ``double-free`` when the communicator comes up after loading. The real lines and where they
    were seen are in :mod:`trtllm_deploy.testbed.standin.faults`.
"""

VERSION = "0.1.0"
