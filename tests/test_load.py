"""Loading: folders, shards, dtypes, the Hugging Face cache, and a clear one-line error for every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hf_models import save_tiny_qwen2

import qwen_mlx
from qwen_mlx import QwenMLXError
from qwen_mlx.model.cache import make_cache


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny"), tie_word_embeddings=False)


def logits(model: qwen_mlx.load, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids])))


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_sharded_checkpoint_loads_like_the_single_file(checkpoint: Path, tmp_path: Path) -> None:
    sharded = save_tiny_qwen2(tmp_path / "sharded", tie_word_embeddings=False, max_shard_size="60KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").exists()
    ids = [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(logits(qwen_mlx.load(sharded)[0], ids), logits(qwen_mlx.load(checkpoint)[0], ids))


def test_unused_rotary_inv_freq_is_dropped(checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    weights = mx.load(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.ones((8,))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    model, _ = qwen_mlx.load(folder)
    np.testing.assert_array_equal(logits(model, [7, 8]), logits(qwen_mlx.load(checkpoint)[0], [7, 8]))


def test_sampling_defaults_come_from_generation_config(checkpoint: Path) -> None:
    model, tokenizer = qwen_mlx.load(checkpoint)
    assert model.sampling_defaults == qwen_mlx.SamplingParams(
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05
    )
    assert tokenizer.eos_token_ids == [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]


def expect_error(folder: Path, *fragments: str) -> None:
    with pytest.raises(QwenMLXError) as info:
        qwen_mlx.load(folder)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_wrong_model_type_is_named(checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    expect_error(folder, "config.json", "'llama'", "qwen2")


def test_shape_that_does_not_match_the_config_is_named(checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    expect_error(folder, "model.safetensors", "mlp", "(128, 64)", "(96, 64)")


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder = save_tiny_qwen2(tmp_path / "sharded", max_shard_size="60KB")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    expect_error(folder, shard.name, "missing")


def test_truncated_safetensors_is_named(checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    expect_error(folder, "model.safetensors", "truncated")


def test_corrupt_safetensors_header_is_named(checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_of(checkpoint, tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at "
    path.write_bytes(bytes(data))
    expect_error(folder, "model.safetensors", "not a valid safetensors file")


def test_pickled_weights_are_refused_without_unpickling(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(checkpoint / "config.json", folder)
    # A pickle that would create a file if anyone unpickled it.
    marker = tmp_path / "unpickled"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (folder / "pytorch_model.bin").write_bytes(payload)
    expect_error(folder, "pytorch_model.bin", "safetensors")
    assert not marker.exists()


def test_missing_folder_and_file_instead_of_folder(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope", "no such folder")
    (tmp_path / "file").write_text("x")
    expect_error(tmp_path / "file", "expected a model folder")


def fake_hub_cache(hf_home: Path, repo_id: str, source: Path) -> None:
    """The layout huggingface_hub writes: refs/main names a snapshot folder of the repo's files."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qwen_mlx.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **env},
    )


def test_repo_id_loads_from_the_hugging_face_cache_offline(checkpoint: Path, tmp_path: Path) -> None:
    fake_hub_cache(tmp_path / "hf", "tiny-org/tiny-qwen", checkpoint)
    result = run_cli(
        ["generate", "--model", "tiny-org/tiny-qwen", "--prompt", "hi", "--max-tokens", "4", "--temp", "0"],
        {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "generation: " in result.stderr


def test_repo_id_offline_without_a_cached_copy_says_how_to_get_it(tmp_path: Path) -> None:
    result = run_cli(
        ["generate", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--prompt", "hi"],
        {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "HF_HUB_OFFLINE" in last and "qwen-mlx pull Qwen/Qwen2.5-0.5B-Instruct" in last


def test_quantized_model_computes_in_float32_on_the_cpu_backend_with_its_weights_as_stored(tmp_path: Path) -> None:
    """MLX's CPU kernels are 8-40x slower for half-precision quantized matmuls, so `load` runs the activations in
    float32; the quantized weights and the KV cache stay in the checkpoint's dtype, as lean as mlx-lm."""
    folder = save_tiny_qwen2(tmp_path / "hf", dtype="float16")
    qwen_mlx.convert(folder, tmp_path / "q4", quantize=True, q_group_size=32)
    model, _ = qwen_mlx.load(tmp_path / "q4")
    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("applies to the CPU backend only")
    proj = model.model.layers[0].self_attn.q_proj
    assert proj.weight.dtype == mx.uint32 and proj.scales.dtype == mx.float16
    assert proj.bias.dtype == mx.float32 and model.model.norm.weight.dtype == mx.float32
    cache = make_cache(model)
    assert model(mx.array([[1, 2, 3]]), cache=cache).dtype == mx.float32
    assert cache[0].keys.dtype == mx.float16
