"""The `qwen-mlx` subcommands: each module adds its parser (`add_parser`) and runs it (`run`)."""
