"""`qwen-mlx bench`, its random-model writer, and benchmarks/vs_mlx_lm.py, smoke-tested on a tiny shape.

Speeds are never asserted here (benchmarks are scripts); only that the figures exist, are positive and agree with
each other and with the token counts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest

import qwen_mlx
from qwen_mlx.cli import main as cli
from qwen_mlx.engine.benchmark import random_prompt, run_trial
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.store.synthetic import SHAPES, random_shape, tiny_config, write_random_quantized_model
from qwen_mlx.store.tokenizer_files import QWEN25_REFERENCE_DIR

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_config(vocab_size=151936, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shape") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_quantized_model(tmp_path_factory.mktemp("tiny") / "model", TINY, 4, 32, "float16")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def figures(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}


def test_7b_shape_is_the_official_config() -> None:
    reference = json.loads((QWEN25_REFERENCE_DIR / "config.json").read_text())
    assert {k: reference[k] for k in SHAPES["qwen2.5-7b"]} == SHAPES["qwen2.5-7b"]
    assert random_shape("7B") == random_shape("qwen2.5-7b")


def test_random_model_loads_in_both_with_the_shape_and_quantization_asked(tiny_folder: Path) -> None:
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    ours, tokenizer = qwen_mlx.load(tiny_folder)
    theirs, _ = mlx_lm.load(str(tiny_folder))
    assert ours.layers[0].mlp.gate_proj.scales.dtype == mx.float16
    assert ours.layers[0].mlp.gate_proj.weight.shape == (128, 64 * 4 // 32)
    ids = mx.array([random_prompt(12, TINY["vocab_size"])])
    ours_logits, theirs_logits = ours(ids), theirs(ids)
    assert ours_logits.shape == (1, 12, TINY["vocab_size"])
    assert mx.isfinite(ours_logits).all().item() and mx.isfinite(theirs_logits).all().item()
    # mlx-lm computes in float16, we in float32: the same model, up to half-precision rounding.
    assert mx.allclose(ours_logits, theirs_logits.astype(mx.float32), atol=0.05, rtol=0.05).item()


def test_untied_shape_gets_its_own_output_projection(tmp_path: Path) -> None:
    folder = write_random_quantized_model(tmp_path, {**TINY, "tie_word_embeddings": False, "vocab_size": 512},
                                          8, 64, "bfloat16")
    model, _ = qwen_mlx.load(folder)
    assert model.lm_head.bits == 8 and model.lm_head.weight.shape == (512, 64 * 8 // 32)


def test_trial_counts_the_tokens_and_its_figures_agree(tiny_folder: Path) -> None:
    model, tokenizer = qwen_mlx.load(tiny_folder)
    trial = run_trial(model, tokenizer, random_prompt(40, TINY["vocab_size"]), 9)
    assert (trial.prompt_tokens, trial.generation_tokens) == (40, 9)
    assert trial.prompt_tps == pytest.approx(40 / trial.time_to_first_token)
    assert trial.generation_tps > 0 and trial.peak_memory > 0
    assert trial.total_time >= trial.time_to_first_token + 8 / trial.generation_tps * 0.99
    assert tokenizer.eos_token_ids  # restored after the trial


def test_bench_cli_reports_trials_and_averages_as_mlx_lm_benchmark(tiny_config_file: Path) -> None:
    result = run("-m", "qwen_mlx.cli", "bench", "--random", str(tiny_config_file), "--q-group-size", "32",
                 "-p", "24", "-g", "6", "-n", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["Trial 1", "Trial 2", "Averages"]
    trials = [figures(line) for line in lines[:2]]
    for trial in trials:
        assert set(trial) == {"prompt_tps", "generation_tps", "time_to_first_token", "peak_memory", "total_time"}
        assert all(v > 0 for v in trial.values())
        ttft = trial["time_to_first_token"]  # printed to the millisecond
        assert 24 / (ttft + 0.0005) <= trial["prompt_tps"] <= 24 / max(ttft - 0.0005, 1e-9)
    average = figures(lines[2])
    assert average["generation_tps"] == pytest.approx(sum(t["generation_tps"] for t in trials) / 2, abs=2e-3)
    assert "Building a random" in result.stderr and "Running warmup" in result.stderr  # progress on stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "0"], "--prompt-tokens/-p must be at least 1"),
        (["-g", "0"], "--generation-tokens/-g must be at least 1"),
        (["--max-kv-size", "3"], "(--max-kv-size) 3 must be larger than 4"),
        (["--q-bits", "5"], "5 bits (--q-bits) is not supported"),
        (["-p", "250", "-g", "10"], "do not fit the model's context (256)"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    tiny_config_file: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", "--random", str(tiny_config_file), "--q-group-size", "32", *args]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("qwen-mlx: error: ") and message in last


def test_unknown_random_shape_names_the_known_ones() -> None:
    with pytest.raises(QwenMLXError, match="qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b, qwen2.5-7b"):
        random_shape("qwen2.5-14b")


def test_vs_mlx_lm_writes_its_table_and_json(tiny_config_file: Path, tmp_path: Path) -> None:
    """The script's layout on a tiny shape and the smallest plan: one round of each side, two chat turns."""
    out = tmp_path / "results" / "vs.json"
    result = run("benchmarks/vs_mlx_lm.py", "--shape", str(tiny_config_file), "--q-group-size", "32",
                 "--dtype", "float32", "--prompt-lengths", "8", "16", "--decode-tokens", "3", "--turns", "2",
                 "--repeats", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert set(data["ratios"]) == {"prefill_8", "prefill_16", "decode", "peak_memory", "weights_memory",
                                   "multi_turn_ttft_vs_no_cache", "multi_turn_ttft_vs_cache"}
    assert all(v > 0 for v in data["ratios"].values())
    assert data["ratios"]["weights_memory"] == pytest.approx(1.0, abs=0.01)  # the same folder, held alike
    for side in ("qwen-mlx", "mlx-lm"):
        (round_,) = data["rounds"][side]
        assert round_["prompts"]["8"]["tokens"] == 3 and round_["prompts"]["16"]["tokens"] == 1
    turns = data["medians"]
    assert len(turns["qwen-mlx"]["turns"]["reuse"]) == 2
    assert set(turns["mlx-lm"]["turns"]) == {"no_cache", "cache"}
    assert len(data["prompt_tokens_per_turn"]) == 2
    assert "| prefill tokens/s, 16-token prompt" in result.stdout and "mlx-lm, prompt cache" in result.stdout
