"""``python -m trtllm_deploy.testbed.standin PROGRAM ARGS...`` (a program of ``cli.PROGRAMS``)."""

import sys

from .cli import main

sys.exit(main())
