"""``python -m trtllm_deploy.standin {trtllm-serve,trtllm-llmapi-launch,vllm} ARGS...``"""

import sys

from .cli import main

sys.exit(main())
