"""The `qwen-mlx` command line: `main.py` is the front door, one module per subcommand (`add_parser` + `run`),
`flags.py` the flags they share. Argparse and printing only: the work is the library's."""
