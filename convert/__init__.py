"""`qwen-mlx convert`: the command (cli.py) over the library's converter, `qwen_mlx.store.conversion`."""
