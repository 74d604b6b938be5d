"""``python -m trtllm_deploy.testbed.standin {trtllm-serve,trtllm-llmapi-launch,vllm} ARGS...``"""

import sys

from .cli import main

sys.exit(main())
