"""`qwen-mlx convert`: Hugging Face Qwen2 weights → an MLX folder, optionally quantized (see convert.py)."""
