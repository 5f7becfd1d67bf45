"""The browser chat: `qwen-mlx webui`, a Gradio page over a ModelWorker (see app.py and cli.py)."""
