"""qwen-mlx: Qwen2 / Qwen2.5 on Apple MLX."""

# First, before anything imports mlx.core: on Linux this loads an optimized BLAS (OpenBLAS) globally, which MLX
# binds only if it is already there when libmlx loads (qwen_mlx/blas.py says why).
from qwen_mlx import blas  # noqa: F401 (imported for what loading it does; keep it first)
from qwen_mlx.engine.evaluate import EvalResult, evaluate
from qwen_mlx.engine.generate import (
    GenerationChunk,
    GenerationResult,
    GenerationStats,
    batch_generate,
    generate,
    stream_generate,
)
from qwen_mlx.engine.request import GenerationRequest, prepare_request
from qwen_mlx.engine.speculative import DraftModel, load_draft
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model.cache import (
    CacheSettings,
    KVCache,
    PromptCache,
    QuantizedKVCache,
    RotatingKVCache,
    load_prompt_cache,
    make_cache,
    save_prompt_cache,
)
from qwen_mlx.model.generation_config import SamplingParams
from qwen_mlx.store.conversion import convert
from qwen_mlx.store.load import DEFAULT_MODEL, load
from qwen_mlx.text.tokenizer import Tokenizer
from qwen_mlx.text.tool_calls import ToolCall, parse_tool_calls

__all__ = [
    "DEFAULT_MODEL",
    "CacheSettings",
    "DraftModel",
    "EvalResult",
    "GenerationChunk",
    "GenerationRequest",
    "GenerationResult",
    "GenerationStats",
    "KVCache",
    "PromptCache",
    "QuantizedKVCache",
    "QwenMLXError",
    "RotatingKVCache",
    "SamplingParams",
    "Tokenizer",
    "ToolCall",
    "batch_generate",
    "convert",
    "evaluate",
    "generate",
    "load",
    "load_draft",
    "load_prompt_cache",
    "make_cache",
    "parse_tool_calls",
    "prepare_request",
    "save_prompt_cache",
    "stream_generate",
]
