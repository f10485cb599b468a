import sys

from rkllm_runtime.cli import main

sys.exit(main())
