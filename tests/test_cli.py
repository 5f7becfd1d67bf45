"""The `qwen-mlx` command end to end on a tiny model folder, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import save_tiny_qwen2

import qwen_mlx


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny"))


def qwen_mlx_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qwen_mlx.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_generate_streams_the_reply_to_stdout_and_stats_to_stderr(folder: Path) -> None:
    result = qwen_mlx_cli("generate", "--model", str(folder), "--prompt", "Hello", "--system", "Be brief.",
                          "--max-tokens", "12", "--temp", "0")
    assert result.returncode == 0, result.stderr
    model, tokenizer = qwen_mlx.load(folder)
    expected = qwen_mlx.generate(model, tokenizer, [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hello"}],
                                 temperature=0, max_tokens=12)
    assert result.stdout == expected.text + "\n"
    assert "generation: 12 tokens" in result.stderr


def test_generate_reads_the_prompt_from_stdin(folder: Path) -> None:
    piped = qwen_mlx_cli("generate", "--model", str(folder), "--prompt", "-", "--max-tokens", "5", "--temp", "0",
                         stdin="Hello")
    direct = qwen_mlx_cli("generate", "--model", str(folder), "--prompt", "Hello", "--max-tokens", "5", "--temp", "0")
    assert piped.returncode == 0 and piped.stdout == direct.stdout


def test_chat_keeps_the_conversation_and_its_cache_between_turns(folder: Path) -> None:
    result = qwen_mlx_cli("chat", "--model", str(folder), "--max-tokens", "6", "--temp", "0", "-v",
                          stdin="Hello there\nAnd again\n/exit\n")
    assert result.returncode == 0, result.stderr
    stats = [line for line in result.stderr.splitlines() if line.startswith("prompt:")]
    assert len(stats) == 2
    assert "(0 reused from cache)" in stats[0]
    reused = int(stats[1].split("(")[1].split()[0])
    first_prompt = int(stats[0].split()[1])
    assert reused >= first_prompt  # the second turn re-reads nothing of the first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--model", "/no/such/folder", "--prompt", "x"], "no such folder"),
        (["generate", "--prompt", "x", "--max-tokens", "0", "--model", "{folder}"], "max_tokens 0"),
        (["generate", "--prompt", "x", "--top-p", "2", "--model", "{folder}"], "top_p 2.0"),
        (["chat", "--prompt-cache", "/no/such.safetensors", "--model", "{folder}"], "cannot read the prompt cache"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(folder: Path, args: list[str], message: str) -> None:
    result = qwen_mlx_cli(*[a.format(folder=folder) for a in args])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qwen-mlx: error: ") and message in last


def test_unknown_flag_is_an_argparse_error() -> None:
    result = qwen_mlx_cli("generate", "--no-such-flag")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_generate_with_a_quantized_kv_cache(tmp_path: Path) -> None:
    folder = save_tiny_qwen2(tmp_path, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    result = qwen_mlx_cli("generate", "--model", str(folder), "--prompt", "Hello", "--kv-bits", "8",
                          "--max-tokens", "6", "--temp", "0")
    assert result.returncode == 0, result.stderr
    assert "generation: 6 tokens" in result.stderr


@pytest.mark.parametrize("flags", [["--prompt-lookup", "4"], ["--draft-model", "{folder}", "--num-draft-tokens", "3"]])
def test_speculative_decoding_flags_print_the_same_reply(folder: Path, flags: list[str]) -> None:
    args = ["generate", "--model", str(folder), "--prompt", "Hello", "--max-tokens", "16", "--temp", "0"]
    plain = qwen_mlx_cli(*args)
    fast = qwen_mlx_cli(*args, *[f.format(folder=folder) for f in flags])
    assert fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout
    assert "drafts accepted" in fast.stderr or "--prompt-lookup" in flags


@pytest.mark.parametrize(("flags", "message"), [
    (["--num-draft-tokens", "3"], "needs a draft source"),
    (["--prompt-lookup", "0"], "prompt_lookup 0"),
    (["--prompt-lookup", "3", "--max-kv-size", "64"], "a rotating one (--max-kv-size) cannot be once it wraps"),
    (["--draft-model", "/no/such/draft"], "/no/such/draft"),
])
def test_bad_speculation_flags_are_one_line_errors(folder: Path, flags: list[str], message: str) -> None:
    result = qwen_mlx_cli("generate", "--model", str(folder), "--prompt", "x", *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
