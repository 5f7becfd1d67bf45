"""The memory plan: what a model will take before anything runs, against what this machine gives MLX.

- Weights: from the safetensors headers (no tensor data read), or from config.json's shapes and quantization for a
  folder that has no weights yet (`qwen-mlx info --q-bits`). On MLX's CPU backend a quantized model keeps its
  quantized layers as stored but holds its few other half-precision tensors in float32 (`cpu.prepare_for_cpu`);
  where `choose_cpu_weights` says they fit, it holds its quantized weights dequantized to float32 instead, and a
  loaded model's plan (`plan_for_model`) counts them so.
- The KV cache per token, for each cache choice: the model's float dtype (float16, bfloat16 or float32), 4 or 8
  bits in groups (packed codes plus a scale and a bias per group), or a rotating window that stops growing.
- The activations of one prefill chunk: one layer's intermediates (layers run one after another), the attention
  scores where they are materialized (MLX's CPU backend; a quantized KV cache everywhere), and the copy a cache
  makes of one layer's buffer when it grows.
- The budget: on Apple silicon Metal's recommended working set (`mx.device_info()`); elsewhere the memory the
  system still has available plus what MLX already holds. $QWEN_MLX_MEMORY_BUDGET (e.g. "16GB") overrides it.

`benchmarks/bench_long_context.py` and tests/test_memory.py hold the plan against `mx.get_peak_memory()`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen_mlx.blas import in_use
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.files import read_json
from qwen_mlx.model.cache import CacheSettings, KVCache
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.model.cpu import PREFILL_CHUNK, WIDE_ROWS
from qwen_mlx.store.weights import safetensors_header, weight_files

FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
HEADER_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 1 << 10, "mib": 1 << 20,
         "gib": 1 << 30, "tib": 1 << 40}
# One layer's live intermediates over a chunk, in units of (chunk x hidden) activations: the residual stream,
# the norm's output, q, k, v and the attention output; half of them when attention and MLP run a few tokens at a
# time (`cpu.in_order`). Fitted to mx.get_peak_memory() on MLX's CPU backend.
HIDDEN_COPIES = 8
MLP_COPIES = 5  # gate, up, silu(gate), their product and the projection's input, each (tokens x intermediate)
SCORE_COPIES = 1  # the scores and their softmax, where attention materializes them
CPU_WEIGHTS_ENV = "QWEN_MLX_CPU_WEIGHTS"
# A quantized model's weights are held in float32 on the CPU (auto) only where that, the weights as stored and a
# first chunk's working set take at most this share of the budget: the rest is room for a context.
FLOAT_WEIGHTS_SHARE = 0.8
# What `choose_cpu_weights` chose, in words (`qwen-mlx info`, `bench`, `model.cpu_weights`).
CPU_WEIGHTS_LABELS = {"float": "float32", "wide": f"quantized, steps over {WIDE_ROWS} rows in float32",
                      "quantized": "quantized"}


@dataclass(frozen=True)
class Budget:
    """Bytes MLX may use here, and where the figure comes from."""

    nbytes: int
    source: str


@dataclass(frozen=True)
class MemoryPlan:
    """A model's memory, planned: resident weights, the KV cache and the activations of a prefill chunk."""

    config: ModelConfig
    weights: int  # bytes resident once loaded
    parameters: int
    quantization: str  # "4-bit, group 64", or "none (bfloat16)"
    dtype: str  # the float dtype the KV cache is kept in
    compute_dtype: str  # the dtype activations are computed in
    cpu: bool  # MLX's CPU backend: attention materializes its scores
    kv_share: float = 1.0  # the part of each position's keys and values this process holds (a split model's rank)

    def kv_bytes_per_token(self, cache: CacheSettings | None = None) -> float:
        cache = cache or CacheSettings()
        c = self.config
        elements = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.kv_share
        if cache.kv_bits is not None:
            return elements * (cache.kv_bits / 8 + 2 * FLOAT_BYTES[self.dtype] / cache.kv_group_size)
        return elements * FLOAT_BYTES[self.dtype]

    def kv_positions(self, positions: int, cache: CacheSettings, chunk: int) -> int:
        """Positions the cache holds room for: whole steps of KVCache.step; a rotating one at most its window
        (plus the chunk it appends before cutting back)."""
        if cache.max_kv_size is not None:
            return min(positions, cache.max_kv_size + chunk)
        return math.ceil(positions / KVCache.step) * KVCache.step

    def kv_bytes(self, positions: int, cache: CacheSettings | None = None, chunk: int = 512) -> int:
        cache = cache or CacheSettings()
        return int(self.kv_positions(positions, cache, chunk) * self.kv_bytes_per_token(cache))

    def activation_bytes(self, positions: int, cache: CacheSettings | None = None, chunk: int = 512) -> int:
        """The working set of the last prefill chunk of a context of `positions`: one layer's intermediates,
        the attention scores where they are materialized, and one layer's cache buffer copied as it grows."""
        cache = cache or CacheSettings()
        c, a = self.config, FLOAT_BYTES[self.compute_dtype]
        length = max(1, min(chunk, positions))
        # The keys the last chunk attends to: every position, or a rotating window and the chunk it appends.
        keys = positions if cache.max_kv_size is None else min(positions, cache.max_kv_size - 1 + length)
        # On the CPU a quantized model runs attention and MLP PREFILL_CHUNK tokens at a time (`cpu.in_order`).
        piece = min(length, PREFILL_CHUNK) if self.cpu and self.quantization_bits else length
        hidden = HIDDEN_COPIES // (2 if piece < length else 1) * length * c.hidden_size * a
        mlp = MLP_COPIES * piece * c.intermediate_size * a
        rotated = cache.max_kv_size is not None and positions > cache.max_kv_size
        # A mask spelled out as an array (quantized attention, a window past its size): it and a comparison.
        mask = 2 * length * keys if cache.kv_bits is not None or rotated else 0
        if self.cpu and not mask:  # the CPU attention spells the causal mask out too, per piece of queries
            mask = piece * keys
        if cache.kv_bits is not None:  # quantized attention: matmuls on the packed keys, every query at once
            scores = SCORE_COPIES * c.num_attention_heads * length * keys * a
        elif self.cpu:
            # MLX's CPU attention materializes (heads, queries, keys): a piece of queries at a time when they run
            # in order (`cpu.in_order`). With keys and values cached in another dtype than the compute dtype
            # (half-precision scales), the peak is measured as a whole chunk's scores plus one layer's promoted
            # keys and values: the per-piece promotions are not ordered, and run ahead.
            scores = SCORE_COPIES * c.num_attention_heads * piece * keys * a
            if self.dtype != self.compute_dtype:
                scores = SCORE_COPIES * c.num_attention_heads * length * keys * a
                scores += 2 * c.num_key_value_heads * c.head_dim * keys * a
        else:  # Metal's fused attention keeps its scores on chip
            scores = 0
        # A growing cache copies one layer's buffer at a time; a rotating one past its window rebuilds every
        # layer's each chunk (temporal order, eviction, the chunk appended).
        kv = self.kv_bytes(positions, cache, chunk)
        grow = kv if rotated else kv // c.num_hidden_layers
        # A decode step's working set: its logits and their float32 log-softmax (no chunk is in flight then).
        decode = c.vocab_size * 4 * 2
        return int(max(hidden + mlp + scores + mask + grow, decode))

    @property
    def quantization_bits(self) -> int | None:
        return (self.config.quantization or {}).get("bits")

    def total(self, positions: int, cache: CacheSettings | None = None, chunk: int = 512) -> int:
        """Peak bytes for a context of `positions`: weights, the KV cache, one prefill chunk's activations."""
        return self.weights + self.kv_bytes(positions, cache, chunk) + self.activation_bytes(positions, cache, chunk)

    def largest_context(self, budget: int, cache: CacheSettings | None = None, chunk: int = 512) -> int:
        """The most positions (up to the model's context length) whose `total` fits `budget`; 0: none."""
        low, high = 0, self.config.context_length
        if self.total(high, cache, chunk) <= budget:
            return high
        while low < high:  # total grows with positions: bisect
            mid = (low + high + 1) // 2
            if self.total(mid, cache, chunk) <= budget:
                low = mid
            else:
                high = mid - 1
        return low


def cache_choices(context: int) -> list[tuple[str, CacheSettings]]:
    """The cache settings `info` and the refusals compare: the model's dtype, 8 and 4 bits, a rotating window."""
    window = min(context, 4096)
    return [("default", CacheSettings()), ("--kv-bits 8", CacheSettings(kv_bits=8)),
            ("--kv-bits 4", CacheSettings(kv_bits=4)), (f"--max-kv-size {window}", CacheSettings(max_kv_size=window))]


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def plan_for_folder(folder: Path, config: ModelConfig | None = None, cpu: bool | None = None) -> MemoryPlan:
    """The plan of a model folder from config.json and its safetensors headers, before any weight is read; a folder
    with config.json alone (e.g. Qwen/Qwen2.5-7B-Instruct's) is planned from its shapes."""
    raw = read_json(folder / "config.json")
    config = config or ModelConfig.from_dict(raw, str(folder / "config.json"))
    cpu = on_cpu() if cpu is None else cpu
    try:
        files = weight_files(folder)
    except QwenMLXError:
        files = []
    if not files:
        return plan_for_config(config, dtype=config_dtype(raw), cpu=cpu)
    tensors: dict[str, dict[str, Any]] = {}
    for path in files:
        tensors.update(safetensors_header(path))
    return plan_from_tensors(config, tensors, cpu)


def config_dtype(raw: dict[str, Any]) -> str:
    """The float dtype config.json names (`torch_dtype`, or transformers 5's `dtype`); bfloat16 if none."""
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
    return dtype if dtype in FLOAT_BYTES else "bfloat16"


def plan_from_tensors(config: ModelConfig, tensors: dict[str, dict[str, Any]], cpu: bool) -> MemoryPlan:
    """Weights as the headers list them, less what `load` drops (rotary tables, a tied lm_head)."""
    quantized = {name.removesuffix(".scales") for name in tensors if name.endswith(".scales")}
    weights = parameters = 0
    floats = []
    for name, t in tensors.items():
        if "rotary_emb.inv_freq" in name or (config.tie_word_embeddings and name.startswith("lm_head.")):
            continue
        size = t["data_offsets"][1] - t["data_offsets"][0]
        layer = name.rpartition(".")[0]
        is_quantized_part = layer in quantized and name.endswith((".scales", ".biases"))
        if t["dtype"] in HEADER_DTYPES and not is_quantized_part:
            floats.append(HEADER_DTYPES[t["dtype"]])
        # On the CPU a quantized model's other half-precision tensors are held in float32 (cpu.prepare_for_cpu).
        upcast = cpu and quantized and t["dtype"] in ("F16", "BF16") and not is_quantized_part
        weights += size * (2 if upcast else 1)
        if layer in quantized and name.endswith(".weight"):
            parameters += math.prod(t["shape"]) * 32 // layer_bits(config, layer)
        elif not is_quantized_part:
            parameters += math.prod(t["shape"])
    scale_dtypes = [HEADER_DTYPES[kind] for q in quantized
                    if (kind := tensors[f"{q}.scales"]["dtype"]) in HEADER_DTYPES]
    dtype = max(set(scale_dtypes or floats), key=(scale_dtypes or floats).count) if (scale_dtypes or floats) \
        else "float32"
    return make_plan(config, weights, parameters, dtype, cpu)


def layer_bits(config: ModelConfig, layer: str) -> int:
    block = config.quantization or {}
    own = block.get(layer)
    return int(own["bits"]) if isinstance(own, dict) else int(block.get("bits", 4))


def make_plan(config: ModelConfig, weights: int, parameters: int, dtype: str, cpu: bool) -> MemoryPlan:
    q = config.quantization
    label = f"{q['bits']}-bit, group {q['group_size']}" if q else f"none ({dtype})"
    # A quantized half-precision model computes in float32 on the CPU (qwen_mlx.model.cpu); otherwise in its own dtype.
    compute = "float32" if cpu and q and dtype != "float32" else dtype
    return MemoryPlan(config, weights, parameters, label, dtype, compute, cpu)


def matrices(config: ModelConfig) -> list[tuple[str, int, int]]:
    """(path, rows, columns) of every Linear and the embedding of a Qwen2, as `model.Qwen2` builds them."""
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    found = [("model.embed_tokens", config.vocab_size, h)]
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}"
        found += [(f"{p}.self_attn.q_proj", h, h), (f"{p}.self_attn.k_proj", kv, h), (f"{p}.self_attn.v_proj", kv, h),
                  (f"{p}.self_attn.o_proj", h, h), (f"{p}.mlp.gate_proj", i, h), (f"{p}.mlp.up_proj", i, h),
                  (f"{p}.mlp.down_proj", h, i)]
    if not config.tie_word_embeddings:
        found.append(("lm_head", config.vocab_size, h))
    return found


def vector_elements(config: ModelConfig) -> int:
    """The q/k/v biases and the norms: the parameters that are never quantized."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    return config.num_hidden_layers * (h + 2 * kv + 2 * h) + h


def plan_for_config(config: ModelConfig, dtype: str = "bfloat16", cpu: bool | None = None, bits: int | None = None,
                    group_size: int = 64) -> MemoryPlan:
    """The plan from shapes alone: config.json's quantization block, or `bits` (what `convert -q` would write)."""
    cpu = on_cpu() if cpu is None else cpu
    if bits is not None:
        config = replace(config, quantization={"group_size": group_size, "bits": bits, "mode": "affine"})
    block = config.quantization or {}
    f = FLOAT_BYTES[dtype]
    weights = parameters = 0
    for path, rows, cols in matrices(config):
        parameters += rows * cols
        own = block.get(path, {})  # the layer's own settings; False: left unquantized
        settings = own or block
        if block and own is not False and cols % int(settings.get("group_size", 64)) == 0:
            b, g = int(settings["bits"]), int(settings["group_size"])
            weights += rows * cols * b // 8 + rows * (cols // g) * 2 * f
        else:
            weights += rows * cols * (4 if cpu and block else f)
    vectors = vector_elements(config)
    parameters += vectors
    weights += vectors * (4 if cpu and block else f)
    return make_plan(config, weights, parameters, dtype, cpu)


def plan_for_model(model: nn.Module) -> MemoryPlan | None:
    """The plan of a loaded model, from its parameters as they are held; None for what is not an MLX model."""
    if not callable(getattr(model, "parameters", None)):
        return None
    params = dict(tree_flatten(model.parameters()))
    quantized = {n.removesuffix(".scales") for n in params if n.endswith(".scales")}
    parameters = 0
    for name, p in params.items():
        layer = name.rpartition(".")[0]
        if layer in quantized and name.endswith(".weight"):
            parameters += p.size * 32 // layer_bits(model.config, layer)
        elif not (layer in quantized and name.endswith((".scales", ".biases"))):
            parameters += p.size
    embedding = model.model.embed_tokens
    stored = embedding.scales.dtype if "scales" in embedding else embedding.weight.dtype
    kv = model.layers[0].self_attn.kv_dtype or model.model.compute_dtype or stored
    plan = make_plan(model.config, sum(p.nbytes for p in params.values()), parameters, dtype_name(kv), on_cpu())
    compute = dtype_name(model.model.compute_dtype or stored)
    # A split model's rank holds the keys and values of its heads (tensor) or its layers (pipeline) only.
    held = len(model.layers) * model.layers[0].self_attn.n_kv_heads
    share = held / (model.config.num_hidden_layers * model.config.num_key_value_heads)
    return replace(plan, compute_dtype=compute, kv_share=share)


def usable_context(model: nn.Module, cache: CacheSettings | None = None) -> int:
    """The positions a loaded model can hold here: its context length, or fewer where memory runs out first (what
    requests are checked against, so a context meter built on it shows the same limit)."""
    plan = plan_for_model(model)
    if plan is None:
        return model.config.context_length
    return plan.largest_context(memory_budget().nbytes, cache)


def split_plan(plan: MemoryPlan, ranks: int) -> MemoryPlan:
    """One rank's share of a model split over `ranks` processes (`qwen_mlx.model.parallel`): about 1/N of the weights
    (every table is split, only the norms are whole) and of the KV cache (its heads, or its stage's layers)."""
    return replace(plan, weights=-(-plan.weights // ranks), kv_share=1 / ranks)


def dtype_name(dtype: mx.Dtype) -> str:
    name = str(dtype).removeprefix("mlx.core.")
    return name if name in FLOAT_BYTES else "float32"


CACHE_OPTIONS = {"--kv-bits 8": "kv_bits=8", "--kv-bits 4": "kv_bits=4"}


def option_name(name: str) -> str:
    """A cache choice as both front ends spell it: "--kv-bits 8 (kv_bits=8)"."""
    api = CACHE_OPTIONS.get(name) or name.replace("--max-kv-size ", "max_kv_size=")
    return f"{name} ({api})"


def first_chunk_bytes(plan: MemoryPlan) -> int:
    """What a model needs beside its weights to run at all: the activations and KV cache of a first prompt chunk."""
    return plan.activation_bytes(min(512, plan.config.context_length)) + plan.kv_bytes(512)


def check_model_fits(plan: MemoryPlan, folder: Path, budget: Budget | None = None) -> None:
    """Refuse, before any weight is read, a model whose weights and first prompt chunk do not fit here."""
    budget = budget or memory_budget()
    first = first_chunk_bytes(plan)
    if plan.weights + first <= budget.nbytes:
        return
    bits = plan.quantization_bits
    at_4_bits = plan_for_config(plan.config, plan.dtype, plan.cpu, bits=4).weights
    smaller = "" if bits is not None and bits <= 4 else (
        f"quantize it (`qwen-mlx convert -q --q-bits 4`: {gb(at_4_bits)} of weights), ")
    raise QwenMLXError(
        f"{folder}: its weights take {gb(plan.weights)} and a first prompt chunk {gb(first)} more, but MLX has "
        f"{gb(budget.nbytes)} here ({budget.source}); {smaller}pick a smaller model, or set "
        f"QWEN_MLX_MEMORY_BUDGET if this figure is wrong")


def check_context_fits(plan: MemoryPlan, positions: int, cache: CacheSettings, chunk: int = 512,
                       what: str = "a context of", field: str | None = None, budget: Budget | None = None) -> None:
    """Refuse `positions` of context that would not fit here, naming the sizes, the cache choices that would
    fit, and the most positions that fit with this one."""
    budget = budget or memory_budget()
    need = plan.total(positions, cache, chunk)
    if need <= budget.nbytes:
        return
    fixes = [option_name(name) for name, c in cache_choices(positions)
             if c != cache and c.max_kv_size is None and plan.total(positions, c, chunk) <= budget.nbytes]
    largest = plan.largest_context(budget.nbytes, cache, chunk)
    fix = f"{' or '.join(fixes[:1])} makes it fit" if fixes else "no KV cache setting makes it fit"
    raise QwenMLXError(
        f"{what} {positions} positions needs {gb(plan.kv_bytes(positions, cache, chunk))} of KV cache beside "
        f"{gb(plan.weights)} of weights and {gb(plan.activation_bytes(positions, cache, chunk))} of activations, "
        f"{gb(need)} in all, but MLX has {gb(budget.nbytes)} here ({budget.source}); {fix}, or keep it to "
        f"{largest} positions with this cache", field)


def check_request_memory(model: nn.Module, prompt_tokens: int, max_tokens: int, cache: CacheSettings,
                         chunk: int) -> None:
    """A request's context (prompt + max_tokens, at most the model's context) must fit before it runs: the
    field at fault is the prompt if it alone does not, else max_tokens."""
    plan = plan_for_model(model)
    if plan is None:
        return
    budget = memory_budget()
    positions = min(prompt_tokens + max_tokens, plan.config.context_length)
    if plan.total(positions, cache, chunk) <= budget.nbytes:
        return
    prompt_fits = plan.total(prompt_tokens, cache, chunk) <= budget.nbytes
    what = f"the prompt of {prompt_tokens} tokens and max_tokens {max_tokens}: " if prompt_fits else "the prompt:"
    check_context_fits(plan, positions if prompt_fits else prompt_tokens, cache, chunk, what,
                       "max_tokens" if prompt_fits else "prompt", budget)


def cpu_weights_setting() -> str:
    """$QWEN_MLX_CPU_WEIGHTS: how MLX's CPU build holds a quantized model's weights (quantized, float or auto)."""
    setting = os.environ.get(CPU_WEIGHTS_ENV, "auto").strip().lower() or "auto"
    if setting not in ("quantized", "float", "auto"):
        raise QwenMLXError(f"{CPU_WEIGHTS_ENV}={setting!r}: expected quantized, float or auto")
    return setting


def choose_cpu_weights(plan: MemoryPlan, budget: Budget | None = None) -> tuple[str, str]:
    """How MLX's CPU build holds and multiplies a quantized model's weights (`cpu.prepare_for_cpu`), and why:
    "float" (held in float32) where an optimized BLAS multiplies them and they fit, with the plan as stored, within
    FLOAT_WEIGHTS_SHARE of the budget (while they are made, the quantized ones are still there); else "wide"
    (held as stored, wide steps dequantized to float32); "quantized" (every step quantized, as before) with the
    reference BLAS or where $QWEN_MLX_CPU_WEIGHTS says so."""
    setting = cpu_weights_setting()
    floats = plan.parameters * 4
    if setting != "auto":
        return setting, f"{CPU_WEIGHTS_ENV}={setting}"
    if not in_use().optimized:
        return "quantized", "the reference BLAS: float32 matmuls never win there"
    budget = budget or memory_budget()
    need = floats + plan.weights + first_chunk_bytes(plan)
    if need > FLOAT_WEIGHTS_SHARE * budget.nbytes:
        return "wide", (f"float32 copies ({gb(floats)}) would not fit: {gb(need)} with the plan, over "
                        f"{FLOAT_WEIGHTS_SHARE:.0%} of {gb(budget.nbytes)} ({budget.source})")
    return "float", f"float32 copies ({gb(floats)}) fit beside the plan in {gb(budget.nbytes)} ({budget.source})"


def parse_bytes(text: str) -> int:
    """"16GB", "12.5 GiB", "800MB" or plain bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise QwenMLXError(f"QWEN_MLX_MEMORY_BUDGET {text!r}: expected a size such as 16GB or 12GiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def memory_budget() -> Budget:
    """What MLX may use on this machine."""
    configured = os.environ.get("QWEN_MLX_MEMORY_BUDGET")
    if configured:
        return Budget(parse_bytes(configured), "QWEN_MLX_MEMORY_BUDGET")
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    if "max_recommended_working_set_size" in info:
        return Budget(int(info["max_recommended_working_set_size"]), "Metal's recommended working set")
    # Elsewhere: what the system still has, plus what MLX already holds (it counts as used there).
    held = mx.get_active_memory() + mx.get_cache_memory()
    return Budget(available_ram() + held, "available RAM")


def available_ram() -> int:
    """MemAvailable (Linux), capped by a cgroup's memory limit; else the free pages sysconf reports."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
