"""The memory plan against what is on disk, what a loaded model holds, and `mx.get_peak_memory()`; the refusals
it makes (a model, a --context, a request); `qwen-mlx info` on the real Qwen2.5-7B-Instruct config."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from hf_models import REFERENCE_DIR

import qwen_mlx
from qwen_mlx import QwenMLXError
from qwen_mlx.cli.main import main
from qwen_mlx.model.cache import CacheSettings
from qwen_mlx.model.config import ModelConfig
from qwen_mlx.store.memory import memory_budget, parse_bytes, plan_for_config, plan_for_folder, plan_for_model
from qwen_mlx.store.synthetic import tiny_config, write_random_model, write_random_quantized_model

# Narrow, with a small vocabulary, so that the KV cache and the activations are most of the memory.
SHAPE = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
         "num_attention_heads": 2, "num_key_value_heads": 2}


def tensor_bytes(folder: Path) -> int:
    """What the safetensors files hold, less their headers: the weights' bytes as written."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            (header,) = struct.unpack("<Q", f.read(8))
        total += path.stat().st_size - 8 - header
    return total


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(**SHAPE, tie_word_embeddings=False)
    return write_random_quantized_model(tmp_path_factory.mktemp("q") / "m", config, 4, 64, "bfloat16")


@pytest.fixture(scope="module")
def half(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("f16")
    return write_random_model(folder, tiny_config(**SHAPE))


def test_weights_from_the_shapes_equal_the_headers_and_the_files(quantized: Path, half: Path) -> None:
    for folder, bits in ((quantized, 4), (half, None)):
        config = ModelConfig.from_file(folder / "config.json")
        raw = json.loads((folder / "config.json").read_text())
        dtype = "bfloat16" if bits else "float16"
        from_headers = plan_for_folder(folder, cpu=False)
        from_shapes = plan_for_config(config, dtype, cpu=False)
        assert from_headers.weights == from_shapes.weights == tensor_bytes(folder), folder
        assert from_headers.parameters == from_shapes.parameters
        index = folder / "model.safetensors.index.json"
        if index.exists():  # written with the parameter count of the unquantized model
            assert from_headers.parameters == json.loads(index.read_text())["metadata"]["total_parameters"]
        assert from_headers.dtype == dtype and ("quantization" in raw) == (bits is not None)


def test_the_plan_of_a_folder_is_what_the_loaded_model_holds(quantized: Path, half: Path) -> None:
    for folder in (quantized, half):
        model, _ = qwen_mlx.load(folder)
        held = plan_for_model(model)
        planned = plan_for_folder(folder)
        assert held.weights == planned.weights == sum(a.nbytes for _, a in _flat(model))
        assert (held.parameters, held.dtype, held.compute_dtype) == (planned.parameters, planned.dtype,
                                                                      planned.compute_dtype)


def _flat(model):  # noqa: ANN001, ANN202
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_qwen25_7b_at_4_bits_is_about_4_3_gb_with_56_kib_a_token() -> None:
    config = ModelConfig.from_file(REFERENCE_DIR / "config.json")
    plan = plan_for_config(config, "bfloat16", cpu=False, bits=4)
    assert 4.2e9 < plan.weights < 4.4e9
    assert 7.5e9 < plan.parameters < 7.7e9
    layers, kv_heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    assert plan.kv_bytes_per_token() == 2 * layers * kv_heads * head_dim * 2 == 56 * 1024
    assert plan.kv_bytes_per_token(CacheSettings(kv_bits=4)) == 2 * layers * kv_heads * (head_dim // 2 + head_dim
                                                                                           // 64 * 4)


def test_info_prints_the_figures_for_the_real_7b_config(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_MLX_MEMORY_BUDGET", "16GB")
    assert main(["info", str(REFERENCE_DIR), "--q-bits", "4"]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(None, 1) for line in out.splitlines()[1:6])
    assert float(rows["weights"].split()[0]) == pytest.approx(4.3, abs=0.05)
    assert rows["quantization"] == "4-bit, group 64"
    assert "131072 positions, YaRN on demand past 32768 (factor 4)" in rows["context"]
    assert "56.00 KiB" in out and "15.75 KiB" in out and "16.00 GB (QWEN_MLX_MEMORY_BUDGET)" in out


# (A quantized KV cache on a float16 model crawls on MLX's CPU build, whose half-precision quantized matmuls are
# 40x slower: benchmarks/bench_long_context.py holds the plan of every cache kind against the peak.)
@pytest.mark.parametrize(("cache", "contexts"), [({}, (1536, 3072)), ({"max_kv_size": 1024}, (2048, 4096))],
                         ids=["float16", "rotating"])
def test_estimates_are_within_10_percent_of_the_peak(half: Path, cache: dict[str, int],
                                                     contexts: tuple[int, ...]) -> None:
    model, tokenizer = qwen_mlx.load(half)
    plan = plan_for_model(model)
    for positions in contexts:
        prompt = mx.random.randint(0, 2000, (positions - 2,), key=mx.random.key(positions)).tolist()
        mx.clear_cache()
        # Arrays other tests still hold (their models) count in the process's peak, not in this model's plan.
        others = mx.get_active_memory() - plan.weights
        result = qwen_mlx.generate(model, tokenizer, prompt, max_tokens=2, temperature=0, **cache)
        peak = mx.get_peak_memory() - others  # generate resets the peak first: the weights and this reply
        assert result.stats.context_tokens >= positions - 1
        estimate = plan.total(positions, CacheSettings(**cache))
        assert abs(estimate - peak) <= 0.1 * peak, (positions, estimate, peak)


def test_a_model_that_cannot_fit_is_refused_before_any_weight_is_read(quantized: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_MLX_MEMORY_BUDGET", "1MB")

    def never(*args: object) -> None:
        raise AssertionError("weights were read")

    monkeypatch.setattr(sys.modules["qwen_mlx.store.load"], "load_weights", never)
    with pytest.raises(QwenMLXError, match=r"weights take 0\.\d\d GB .* but MLX has 0\.00 GB here "
                                           r"\(QWEN_MLX_MEMORY_BUDGET\)") as e:
        qwen_mlx.load(quantized)
    assert "\n" not in str(e.value) and "smaller model" in str(e.value)


def test_a_request_that_would_not_fit_names_the_cache_that_would(half: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = qwen_mlx.load(half, context_length=65536)
    plan = plan_for_model(model)
    positions = 40000
    between = (plan.total(positions) + plan.total(positions, CacheSettings(kv_bits=8))) // 2
    monkeypatch.setenv("QWEN_MLX_MEMORY_BUDGET", str(between))
    with pytest.raises(QwenMLXError, match=r"--kv-bits 8 \(kv_bits=8\) makes it fit") as e:
        qwen_mlx.prepare_request(model, tokenizer, [1] * 32000, max_tokens=positions - 32000)
    assert e.value.field == "max_tokens" and "\n" not in str(e.value)
    qwen_mlx.prepare_request(model, tokenizer, [1] * 32000, max_tokens=positions - 32000, kv_bits=8)
    monkeypatch.setenv("QWEN_MLX_MEMORY_BUDGET", str(plan.weights))
    with pytest.raises(QwenMLXError, match="the prompt") as e:
        qwen_mlx.prepare_request(model, tokenizer, [1] * 1000, max_tokens=1)
    assert e.value.field == "prompt"


def test_a_context_flag_that_cannot_fit_fails_before_loading(half: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_for_folder(half, ModelConfig.from_file(half / "config.json").with_context(131072))
    monkeypatch.setenv("QWEN_MLX_MEMORY_BUDGET", str(plan.total(131072, CacheSettings(kv_bits=4))))
    monkeypatch.setattr("qwen_mlx.engine.setup.load", lambda *a, **k: pytest.fail("loaded"))
    assert main(["generate", "--model", str(half), "--context", "131072", "-p", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("qwen-mlx: error: --context 131072: 131072 positions needs")
    assert "--kv-bits 4 (kv_bits=4) makes it fit" in err


def test_the_budget_and_its_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_bytes("16GB") == 16 * 10**9 and parse_bytes("1.5 GiB") == 3 << 29 and parse_bytes("100") == 100
    with pytest.raises(QwenMLXError, match="QWEN_MLX_MEMORY_BUDGET"):
        parse_bytes("lots")
    monkeypatch.delenv("QWEN_MLX_MEMORY_BUDGET", raising=False)
    budget = memory_budget()
    info = mx.device_info()
    expected = "Metal's recommended working set" if "max_recommended_working_set_size" in info else "available RAM"
    assert budget.source == expected and budget.nbytes > 0


def test_largest_context_is_the_edge_of_the_budget() -> None:
    config = ModelConfig.from_file(REFERENCE_DIR / "config.json").with_context(131072)
    plan = plan_for_config(config, "bfloat16", cpu=False, bits=4)
    budget = 10 * 10**9
    for cache in (CacheSettings(), CacheSettings(kv_bits=4)):
        n = plan.largest_context(budget, cache)
        assert plan.total(n, cache) <= budget and (n == 131072 or plan.total(n + 1, cache) > budget)
    assert math.isclose(plan.kv_bytes(32768), 32768 * 56 * 1024)
