"""`python -m qwen_mlx.cli`: the same front door as the `qwen-mlx` script."""

import sys

from qwen_mlx.cli.main import main

sys.exit(main())
