"""`qwen-mlx convert`: Hugging Face folders → MLX folders that mlx-lm and qwen-mlx both load, written atomically.

The sources are random tiny Qwen2 models saved by transformers' `save_pretrained`; the reference for every
on-disk detail is what `mlx_lm.convert` writes for the same input and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from hf_models import TINY_VOCAB, save_tiny_qwen2
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.utils import compute_bits_per_weight

import qwen_mlx.store.weights as weight_files
from qwen_mlx.cli import main as cli
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.store.conversion import convert, parse_q_keep
from qwen_mlx.store.load import load_model

# Qwen2.5's rope_theta. transformers >= 5 saves it only inside `rope_parameters`, which mlx-lm does not read,
# so a folder written by mlx_lm.convert runs in mlx-lm with this value whatever the config says.
ROPE_THETA = 1_000_000.0
CASES = [(tied, bits, group) for tied in ("tied", "untied") for bits in (4, 8) for group in (32, 64)]
IDS = mx.random.randint(0, TINY_VOCAB, (8, 32), key=mx.random.key(0))


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "tied": save_tiny_qwen2(root / "tied", rope_theta=ROPE_THETA),
        "untied": save_tiny_qwen2(root / "untied", seed=1, tie_word_embeddings=False, rope_theta=ROPE_THETA),
    }


@pytest.fixture(scope="session")
def ours(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Callable[..., Path]:
    """Our conversion of a source with some settings, made once per session."""
    return _cached(tmp_path_factory.mktemp("ours"), lambda src, out, **kw: convert(src, out, **kw), sources)


@pytest.fixture(scope="session")
def theirs(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Callable[..., Path]:
    """mlx_lm.convert's conversion of a source with the same settings, made once per session."""

    def run(src: Path, out: Path, **kw: Any) -> None:
        mlx_lm_convert(str(src), str(out), **{_MLX_LM_NAMES.get(k, k): v for k, v in kw.items()})

    return _cached(tmp_path_factory.mktemp("theirs"), run, sources)


_MLX_LM_NAMES = {"q_keep": "quant_predicate"}


def _cached(root: Path, run: Callable[..., Any], sources: dict[str, Path]) -> Callable[..., Path]:
    done: dict[str, Path] = {}

    def get(source: str | Path, **settings: Any) -> Path:
        key = repr((str(source), sorted(settings.items(), key=lambda kv: kv[0])))
        if key not in done:
            out = root / f"out{len(done)}"
            run(sources.get(str(source), source), out, **settings)
            done[key] = out
        return done[key]

    return get


def logits(model: nn.Module) -> mx.array:
    out = model(IDS)
    mx.eval(out)
    return out


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def tensors(folder: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for path in sorted(folder.glob("*.safetensors")):
        arrays, metadata = mx.load(str(path), return_metadata=True)
        assert metadata == {"format": "mlx"}, path
        weights.update(arrays)
    return weights


def assert_same_tensors(ours: dict[str, mx.array], theirs: dict[str, mx.array]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, array in ours.items():
        assert array.dtype == theirs[name].dtype, name
        assert array.shape == theirs[name].shape, name
        assert mx.array_equal(array, theirs[name]).item(), name


def kl_divergence(reference: mx.array, other: mx.array) -> mx.array:
    log_p = reference - mx.logsumexp(reference, -1, keepdims=True)
    log_q = other - mx.logsumexp(other, -1, keepdims=True)
    return (mx.exp(log_p) * (log_p - log_q)).sum(-1)


def run_cli(*argv: str | Path) -> int:
    return cli.main(["convert", *map(str, argv)])


# --- output: loads in both, agrees with the float model, matches mlx_lm.convert bit for bit ----------------------


@pytest.mark.parametrize(("kind", "bits", "group"), CASES)
def test_quantized_output_loads_in_mlx_lm_and_qwen_mlx_with_equal_logits(
    ours: Callable[..., Path], kind: str, bits: int, group: int
) -> None:
    out = ours(kind, quantize=True, q_bits=bits, q_group_size=group)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": group, "bits": bits, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]
    theirs_model, _ = mlx_lm.load(str(out))
    our_model, _ = load_model(out)
    assert isinstance(our_model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert our_model.layers[0].mlp.down_proj.bits == bits
    assert mx.allclose(logits(our_model), logits(theirs_model), atol=1e-4).item()


# Measured on these random tiny models (8 x 32 random tokens; the models are near-uniform, so KL is small and
# top-1 fragile): relative RMS logit error 0.16-0.19 at 4 bits and 0.008-0.010 at 8 bits, mean KL 4.5e-4-6.1e-4
# and 1-2e-6, top-1 agreement 0.70-0.79 and 0.97-1.0. The bounds leave some room over those.
BOUNDS = {4: {"relative_error": 0.25, "kl": 1e-3, "top1": 0.6}, 8: {"relative_error": 0.015, "kl": 1e-5, "top1": 0.94}}


@pytest.mark.parametrize(("kind", "bits", "group"), CASES)
def test_quantized_logits_stay_close_to_the_float_model(
    sources: dict[str, Path], ours: Callable[..., Path], kind: str, bits: int, group: int
) -> None:
    reference = logits(load_model(sources[kind])[0])
    quantized = logits(load_model(ours(kind, quantize=True, q_bits=bits, q_group_size=group))[0])
    centered = reference - reference.mean(-1, keepdims=True)
    relative_error = (mx.sqrt(((quantized - reference) ** 2).mean()) / mx.sqrt((centered**2).mean())).item()
    kl = kl_divergence(reference, quantized).mean().item()
    top1 = (quantized.argmax(-1) == reference.argmax(-1)).mean().item()
    bound = BOUNDS[bits]
    assert relative_error < bound["relative_error"]
    assert kl < bound["kl"]
    assert top1 >= bound["top1"]


@pytest.mark.parametrize(("kind", "bits", "group"), CASES)
def test_quantized_weights_are_bit_identical_to_mlx_lm_convert(
    ours: Callable[..., Path], theirs: Callable[..., Path], kind: str, bits: int, group: int
) -> None:
    settings = {"quantize": True, "q_bits": bits, "q_group_size": group}
    mine, reference = ours(kind, **settings), theirs(kind, **settings)
    assert_same_tensors(tensors(mine), tensors(reference))
    assert {p.name for p in mine.glob("*.safetensors")} == {"model.safetensors"}
    index = "model.safetensors.index.json"
    assert json.loads((mine / index).read_text()) == json.loads((reference / index).read_text())
    config, their_config = (json.loads((f / "config.json").read_text()) for f in (mine, reference))
    assert config["quantization"] == their_config["quantization"]
    assert list(config) == sorted(config)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in mine.iterdir()}


def test_summary_reports_sizes_and_the_bits_per_weight_mlx_lm_computes(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    summary = convert(sources["untied"], tmp_path / "out", quantize=True)
    model, _ = mlx_lm.load(str(tmp_path / "out"))
    assert summary.bits_per_weight == pytest.approx(compute_bits_per_weight(model), rel=1e-9)
    assert summary.output_bytes == (tmp_path / "out" / "model.safetensors").stat().st_size
    assert summary.source_bytes == (sources["untied"] / "model.safetensors").stat().st_size
    assert summary.output_bytes < summary.source_bytes / 4
    assert "bits per weight" in str(summary)


def test_a_folder_written_by_mlx_lm_convert_loads_in_qwen_mlx_with_equal_logits(
    ours: Callable[..., Path], theirs: Callable[..., Path]
) -> None:
    reference = theirs("untied", quantize=True, q_bits=4, q_group_size=64)
    our_model, _ = load_model(reference)
    their_model, _ = mlx_lm.load(str(reference))
    assert mx.allclose(logits(our_model), logits(their_model), atol=1e-4).item()
    same_weights, _ = load_model(ours("untied", quantize=True, q_bits=4, q_group_size=64))
    assert mx.array_equal(logits(our_model), logits(same_weights)).item()


def test_dtype_casts_the_unquantized_tensors_and_the_scales_like_mlx_lm(
    ours: Callable[..., Path], theirs: Callable[..., Path]
) -> None:
    settings = {"quantize": True, "q_bits": 4, "q_group_size": 64, "dtype": "bfloat16"}
    mine = tensors(ours("untied", **settings))
    assert_same_tensors(mine, tensors(theirs("untied", **settings)))
    assert mine["model.norm.weight"].dtype == mx.bfloat16
    assert mine["lm_head.scales"].dtype == mx.bfloat16
    assert mine["lm_head.weight"].dtype == mx.uint32


def test_float_conversion_keeps_the_weights_and_rope_theta_reaches_mlx_lm(tmp_path: Path) -> None:
    source = save_tiny_qwen2(tmp_path / "hf", rope_theta=10_000.0)
    convert(source, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization" not in config and config["rope_theta"] == 10_000.0
    reference, _ = load_model(source)
    our_model, _ = load_model(tmp_path / "out")
    their_model, _ = mlx_lm.load(str(tmp_path / "out"))
    assert mx.array_equal(logits(our_model), logits(reference)).item()
    assert mx.allclose(logits(their_model), logits(reference), atol=1e-4).item()


# --- dequantize, mixed precision, layers left in full precision, shards -----------------------------------------


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_dequantize_round_trip(ours: Callable[..., Path], theirs: Callable[..., Path], kind: str) -> None:
    quantized_folder = ours(kind, quantize=True, q_bits=4, q_group_size=32)
    dequantized_folder = ours(quantized_folder, dequantize=True)
    config = json.loads((dequantized_folder / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    quantized, dequantized = tensors(quantized_folder), tensors(dequantized_folder)
    assert not any(name.endswith((".scales", ".biases")) for name in dequantized)
    name = "model.layers.0.self_attn.q_proj"
    expected = mx.dequantize(
        quantized[f"{name}.weight"], quantized[f"{name}.scales"], quantized[f"{name}.biases"], 32, 4
    )
    assert mx.array_equal(dequantized[f"{name}.weight"], expected).item()
    assert_same_tensors(dequantized, tensors(theirs(quantized_folder, dequantize=True)))
    float_model, _ = load_model(dequantized_folder)
    assert isinstance(float_model.layers[0].self_attn.q_proj, nn.Linear)
    quantized_model, _ = load_model(quantized_folder)
    assert mx.allclose(logits(float_model), logits(quantized_model), atol=1e-5).item()
    their_model, _ = mlx_lm.load(str(dequantized_folder))
    assert mx.allclose(logits(float_model), logits(their_model), atol=1e-4).item()


def test_q_keep_stores_chosen_layers_at_higher_bits_recorded_per_layer_like_mlx_lm(
    ours: Callable[..., Path], theirs: Callable[..., Path]
) -> None:
    out = ours("untied", quantize=True, q_bits=4, q_group_size=64, q_keep="embed_tokens,lm_head=8")
    eight = {"group_size": 64, "bits": 8, "mode": "affine"}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {
        "group_size": 64, "bits": 4, "mode": "affine", "model.embed_tokens": eight, "lm_head": eight
    }

    def keep_head_and_embedding(path: str, module: nn.Module) -> bool | dict[str, Any]:
        return dict(eight) if path in ("model.embed_tokens", "lm_head") else True

    reference = theirs("untied", quantize=True, q_bits=4, q_group_size=64, q_keep=keep_head_and_embedding)
    assert_same_tensors(tensors(out), tensors(reference))
    our_model, _ = load_model(out)
    bits = (our_model.lm_head.bits, our_model.model.embed_tokens.bits, our_model.layers[0].mlp.up_proj.bits)
    assert bits == (8, 8, 4)
    their_model, _ = mlx_lm.load(str(out))
    assert mx.allclose(logits(our_model), logits(their_model), atol=1e-4).item()


def test_q_keep_specs_name_layers_with_optional_bits() -> None:
    assert parse_q_keep(["embed_tokens,lm_head=8", "down_proj=6", "v_proj"]) == {
        "embed_tokens": 8, "lm_head": 8, "down_proj": 6, "v_proj": 8
    }


def test_layers_not_divisible_by_the_group_size_stay_in_full_precision(
    tmp_path_factory: pytest.TempPathFactory, ours: Callable[..., Path], theirs: Callable[..., Path]
) -> None:
    source = save_tiny_qwen2(tmp_path_factory.mktemp("hf96") / "m", intermediate_size=96, rope_theta=ROPE_THETA)
    out = ours(source, quantize=True, q_bits=4, q_group_size=64)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["model.layers.0.mlp.down_proj"] is False
    assert quantization["model.layers.1.mlp.down_proj"] is False
    weights = tensors(out)
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.float32
    assert "model.layers.0.mlp.down_proj.scales" not in weights
    assert "model.layers.0.mlp.up_proj.scales" in weights
    assert_same_tensors(weights, tensors(theirs(source, quantize=True, q_bits=4, q_group_size=64)))
    our_model, _ = load_model(out)
    their_model, _ = mlx_lm.load(str(out))
    assert isinstance(our_model.layers[0].mlp.down_proj, nn.Linear)
    assert mx.allclose(logits(our_model), logits(their_model), atol=1e-4).item()


def test_large_models_are_written_in_shards_with_an_index(
    sources: dict[str, Path], ours: Callable[..., Path], tmp_path: Path
) -> None:
    hf_sharded = save_tiny_qwen2(tmp_path / "hf", seed=1, tie_word_embeddings=False, rope_theta=ROPE_THETA,
                                 max_shard_size="100KB")
    assert len(list(hf_sharded.glob("*.safetensors"))) > 1
    convert(hf_sharded, tmp_path / "out", quantize=True, max_shard_bytes=20_000)
    out = tmp_path / "out"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weights = tensors(out)
    assert set(index["weight_map"]) == set(weights) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in weights.values())
    for shard in shards:
        arrays = mx.load(str(out / shard))
        assert len(arrays) == 1 or sum(v.nbytes for v in arrays.values()) <= 20_000
    assert_same_tensors(weights, tensors(ours("untied", quantize=True, q_bits=4, q_group_size=64)))
    our_model, _ = load_model(out)
    their_model, _ = mlx_lm.load(str(out))
    assert mx.allclose(logits(our_model), logits(their_model), atol=1e-4).item()


# --- nothing lost, nothing half-written ---------------------------------------------------------------------------


def failing_writer(exception: BaseException) -> Callable[[Path, dict[str, mx.array]], None]:
    """write_shard that writes the first shard, then fails on the second."""
    write_shard = weight_files.write_shard
    written: list[Path] = []

    def write(path: Path, shard: dict[str, mx.array]) -> None:
        if written:
            raise exception
        write_shard(path, shard)
        written.append(path)

    return write


@pytest.mark.parametrize(
    ("exception", "raised"),
    [(OSError(28, "No space left on device"), QwenMLXError), (KeyboardInterrupt(), KeyboardInterrupt)],
)
def test_a_failure_while_writing_leaves_no_target_and_the_source_unchanged(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exception: BaseException,
    raised: type[BaseException],
) -> None:
    """A full disk is the user's to fix (a one-line error); Ctrl-C stays Ctrl-C. Neither leaves a trace."""
    before = digest(sources["tied"])
    monkeypatch.setattr(weight_files, "write_shard", failing_writer(exception))
    with pytest.raises(raised, match="No space left" if raised is QwenMLXError else None):
        convert(sources["tied"], tmp_path / "out", quantize=True, max_shard_bytes=20_000)
    assert list(tmp_path.iterdir()) == []
    assert digest(sources["tied"]) == before


def test_a_failed_forced_conversion_keeps_the_old_target(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    convert(sources["tied"], target)
    old = digest(target)
    monkeypatch.setattr(weight_files, "write_shard", failing_writer(OSError(28, "No space left on device")))
    with pytest.raises(QwenMLXError):
        convert(sources["tied"], target, quantize=True, force=True, max_shard_bytes=20_000)
    assert digest(target) == old
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


KILLED_RUN = """
import sys, time
from pathlib import Path
import qwen_mlx.store.conversion as conversion
import qwen_mlx.store.weights as weight_files
write_shard = weight_files.write_shard
def write_then_hang(path, shard):
    write_shard(path, shard)
    Path(sys.argv[3]).touch()
    time.sleep(120)
weight_files.write_shard = write_then_hang
conversion.convert(sys.argv[1], sys.argv[2], quantize=True, max_shard_bytes=20_000)
"""


def test_a_conversion_killed_midway_leaves_only_a_hidden_temporary_folder(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    before = digest(sources["untied"])
    target, marker = tmp_path / "out" / "model", tmp_path / "shard-written"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(sources["untied"]), str(target), str(marker)],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the conversion never wrote a shard"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not target.exists()
    (leftover,) = target.parent.iterdir()
    assert leftover.name.startswith(".model.") and leftover.name.endswith(".tmp")
    assert any(leftover.glob("model-*.safetensors"))
    assert digest(sources["untied"]) == before


def test_an_existing_target_is_refused_without_force_and_only_a_model_is_replaced_with_it(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(QwenMLXError, match="--force"):
        convert(sources["tied"], target, quantize=True)
    # --force replaces a model folder only: a folder of other files is named and left as it is.
    with pytest.raises(QwenMLXError, match="not a model.*notes.txt"):
        convert(sources["tied"], target, quantize=True, force=True)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    (target / "notes.txt").unlink()
    convert(sources["tied"], target)
    convert(sources["tied"], target, quantize=True, force=True)
    assert load_model(target)[0].config.quantization
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_existing_empty_target_is_used(sources: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    convert(sources["tied"], tmp_path / "out", quantize=True)
    load_model(tmp_path / "out")


# --- the CLI: one progress bar, a summary; each user mistake is one line and exit code 2 --------------------------


def test_cli_converts_end_to_end_with_a_progress_bar_and_a_summary(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(sources["untied"])
    assert run_cli("--hf-path", sources["untied"], "--mlx-path", tmp_path / "out", "-q") == 0
    out, err = capsys.readouterr()
    assert "Converting" in err and "lm_head" in err
    assert "4-bit, group size 64" in out and "bits per weight" in out
    mlx_lm.load(str(tmp_path / "out"))
    assert digest(sources["untied"]) == before


def _copy(sources: dict[str, Path], tmp_path: Path, kind: str = "tied") -> Path:
    return Path(shutil.copytree(sources[kind], tmp_path / "src"))


def not_qwen2(sources: dict[str, Path], tmp_path: Path) -> list[str | Path]:
    src = _copy(sources, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    return ["--hf-path", src]


def pickled_weights(sources: dict[str, Path], tmp_path: Path) -> list[str | Path]:
    src = _copy(sources, tmp_path)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    return ["--hf-path", src]


def missing_shard(sources: dict[str, Path], tmp_path: Path) -> list[str | Path]:
    src = save_tiny_qwen2(tmp_path / "src", rope_theta=ROPE_THETA, max_shard_size="100KB")
    (src / "model-00002-of-00004.safetensors").unlink()
    return ["--hf-path", src]


def truncated_shard(sources: dict[str, Path], tmp_path: Path) -> list[str | Path]:
    src = _copy(sources, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["--hf-path", src]


def corrupt_header(sources: dict[str, Path], tmp_path: Path) -> list[str | Path]:
    src = _copy(sources, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(b"\xff" * 16 + data[16:])
    return ["--hf-path", src]


def no_tokenizer(sources: dict[str, Path], tmp_path: Path) -> list[str | Path]:
    src = _copy(sources, tmp_path)
    (src / "tokenizer.json").unlink()
    return ["--hf-path", src]


def no_such_folder(sources: dict[str, Path], tmp_path: Path) -> list[str | Path]:
    return ["--hf-path", tmp_path / "nowhere"]


def already_quantized(sources: dict[str, Path], tmp_path: Path) -> list[str | Path]:
    convert(sources["tied"], tmp_path / "src", quantize=True)
    return ["--hf-path", tmp_path / "src", "-q"]


def target_inside_source(sources: dict[str, Path], tmp_path: Path) -> list[str | Path]:
    src = _copy(sources, tmp_path)
    return ["--hf-path", src, "--mlx-path", src / "mlx"]


def existing_target(sources: dict[str, Path], tmp_path: Path) -> list[str | Path]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    return ["--hf-path", sources["tied"]]


def with_flags(*flags: str) -> Callable[[dict[str, Path], Path], list[str | Path]]:
    return lambda sources, tmp_path: ["--hf-path", sources["tied"], *flags]


BAD_INPUTS = {
    "not_qwen2": (not_qwen2, "model_type is 'llama'"),
    "pickled_weights": (pickled_weights, "only pickled weights (pytorch_model.bin)"),
    "missing_shard": (missing_shard, "shard model-00002-of-00004.safetensors listed in model.safetensors.index.json"),
    "truncated_shard": (truncated_shard, "model.safetensors: truncated"),
    "corrupt_header": (corrupt_header, "model.safetensors: not a valid safetensors file"),
    "no_tokenizer": (no_tokenizer, "no tokenizer.json"),
    "no_such_folder": (no_such_folder, "no such folder"),
    "already_quantized": (already_quantized, "already quantized"),
    "target_inside_source": (target_inside_source, "overlaps the source folder"),
    "existing_target": (existing_target, "exists and is not empty; pass --force"),
    "bits": (with_flags("-q", "--q-bits", "5"), "5 bits (--q-bits) is not supported; choose one of 2, 3, 4, 6, 8"),
    "group_size": (with_flags("-q", "--q-group-size", "48"), "group size 48 (--q-group-size) is not supported"),
    "quantize_and_dequantize": (with_flags("-q", "-d"), "choose either --quantize or --dequantize"),
    "dequantize_float": (with_flags("-d"), "the model is not quantized"),
    "q_keep_without_q": (with_flags("--q-keep", "lm_head=8"), "--q-keep only applies when quantizing"),
    "q_keep_unknown_layer": (with_flags("-q", "--q-keep", "lm_hed=8"), "no layer is named 'lm_hed'"),
    "q_keep_bits": (with_flags("-q", "--q-keep", "embed_tokens=5"), "embed_tokens=5: 5 bits is not supported"),
    "q_keep_not_a_number": (with_flags("-q", "--q-keep", "embed_tokens=high"), "'high' is not a number of bits"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error_and_exit_code_2(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    make_argv, message = BAD_INPUTS[case]
    argv = make_argv(sources, tmp_path)
    if "--mlx-path" not in argv:
        argv += ["--mlx-path", tmp_path / "out"]
    target = Path(argv[argv.index("--mlx-path") + 1])
    existed = target.exists()
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("qwen-mlx: error: ") and message in err, err
    assert target.exists() == existed
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
