"""qwen-mlx: Qwen2 / Qwen2.5 on Apple MLX."""

from qwen_mlx.cache import KVCache, PromptCache, RotatingKVCache, load_prompt_cache, make_cache, save_prompt_cache
from qwen_mlx.chat import ToolCall, parse_tool_calls
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.generate import GenerationChunk, GenerationResult, GenerationStats, generate, stream_generate
from qwen_mlx.load import DEFAULT_MODEL, load
from qwen_mlx.sample import SamplingParams
from qwen_mlx.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "GenerationChunk",
    "GenerationResult",
    "GenerationStats",
    "KVCache",
    "PromptCache",
    "QwenMLXError",
    "RotatingKVCache",
    "SamplingParams",
    "Tokenizer",
    "ToolCall",
    "convert",
    "generate",
    "load",
    "load_prompt_cache",
    "make_cache",
    "parse_tool_calls",
    "save_prompt_cache",
    "stream_generate",
]


def convert(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - signature documented in qwen_mlx.converter.convert
    """Hugging Face safetensors → an MLX (optionally quantized) folder; see `qwen_mlx.converter.convert`."""
    from qwen_mlx.converter.convert import convert as _convert

    return _convert(*args, **kwargs)
