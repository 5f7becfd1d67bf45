"""Bad input, table by table: every mistake a user (or a damaged file) can make is one line naming the problem —
exit code 2 from the CLI, a `QwenMLXError` from the library, a 400 naming the field from the server — never a
traceback or a 500, and nothing of the user's is lost. A new command or input gets its rows here."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import pytest
from hf_models import save_tiny_qwen2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import free_port, start_server, stop_server

import qwen_mlx
from qwen_mlx import QwenMLXError
from qwen_mlx.cli import main as cli
from qwen_mlx.cli.terminal import prompt_cache_metadata
from qwen_mlx.model.cache import cache_checksum


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("good"))


@pytest.fixture
def folder(good: Path, tmp_path: Path) -> Path:
    """A copy of a good model folder, for one row to break."""
    return Path(shutil.copytree(good, tmp_path / "model"))


def one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qwen-mlx: error: ")
    return last


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def write_safetensors_header(path: Path, header: Any) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


def int32_weights(folder: Path) -> None:
    weights = mx.load(str(folder / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"].astype(mx.int32)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


def outside_shard(folder: Path) -> None:
    names = list(mx.load(str(folder / "model.safetensors")))
    index = {"weight_map": dict.fromkeys(names, "../../outside.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def symlink_loop(name: str) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (folder / name).unlink()
        os.symlink(folder / f"{name}.loop", folder / name)
        os.symlink(folder / name, folder / f"{name}.loop")
    return make


def folder_in_place_of(name: str) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()
    return make


# --- a model folder's files ---

MODEL_FOLDER_ROWS: list[tuple[str, Callable[[Path], None], str]] = [
    ("hidden_size negative", lambda f: edit_json(f / "config.json", hidden_size=-64), "hidden_size is -64"),
    ("hidden_size a word", lambda f: edit_json(f / "config.json", hidden_size="sixty-four"),
     "hidden_size is 'sixty-four'"),
    ("hidden_size null", lambda f: edit_json(f / "config.json", hidden_size=None), "hidden_size is None"),
    ("no attention heads", lambda f: edit_json(f / "config.json", num_attention_heads=0),
     "num_attention_heads is 0"),
    ("negative attention heads", lambda f: edit_json(f / "config.json", num_attention_heads=-4),
     "num_attention_heads is -4"),
    ("quantization yes", lambda f: edit_json(f / "config.json", quantization="yes"), "quantization is 'yes'"),
    ("rope_scaling a word", lambda f: edit_json(f / "config.json", rope_scaling="yarn"), "rope_scaling is 'yarn'"),
    ("hot temperature", lambda f: edit_json(f / "generation_config.json", temperature="hot"),
     "temperature must be a finite number"),
    ("safetensors header a list", lambda f: write_safetensors_header(f / "model.safetensors", [1, 2]),
     "its header is a JSON list"),
    ("tensor without data_offsets", lambda f: write_safetensors_header(
        f / "model.safetensors", {"model.norm.weight": {"dtype": "F32", "shape": [64]}}), "data_offsets"),
    ("weight_map a list", lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}'),
     "weight_map must map"),
    ("shard outside the folder", outside_shard, "not a file in the model folder"),
    ("int32 weights", int32_weights, "where floating-point weights belong"),
    ("weights a symlink loop", symlink_loop("model.safetensors"), "cannot read it"),
    ("config a symlink loop", symlink_loop("config.json"), "cannot read it"),
    ("weights a folder", folder_in_place_of("model.safetensors"), "is a folder"),
]


@pytest.mark.parametrize(("mutate", "phrase"), [r[1:] for r in MODEL_FOLDER_ROWS],
                         ids=[r[0] for r in MODEL_FOLDER_ROWS])
def test_a_broken_model_folder_is_one_line(folder: Path, mutate: Callable[[Path], None], phrase: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    mutate(folder)
    code = cli.main(["generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "1"])
    assert phrase in one_line_error(capsys, code)


# --- generation arguments, from Python ---

GENERATE_ROWS: list[tuple[str, Any, dict[str, Any], str]] = [
    ("temperature NaN", "hi", {"temperature": math.nan}, "temperature must be a finite number"),
    ("repetition penalty NaN", "hi", {"repetition_penalty": math.nan}, "repetition_penalty must be a finite"),
    ("max_tokens a string", "hi", {"max_tokens": "5"}, "max_tokens '5' must be an integer"),
    ("max_tokens a float", "hi", {"max_tokens": 5.5}, "max_tokens 5.5 must be an integer"),
    ("bools as token ids", [True, False], {}, "the prompt must be"),
    ("bytes as the prompt", b"hi", {}, "not bytes"),
    ("content None", [{"role": "user", "content": None}], {}, "content must be a string, not NoneType"),
    ("content an int", [{"role": "user", "content": 5}], {}, "content must be a string, not int"),
    ("prefill_step_size 0", "hi", {"prefill_step_size": 0}, "prefill_step_size 0"),
    ("an unknown role", [{"role": "usr", "content": "hi"}], {}, "has role 'usr'"),
    ("a lone surrogate", "caf\udce9", {}, "not valid UTF-8"),
    ("stop not strings", "hi", {"stop": [1]}, "stop must be"),
    ("17 stop strings", "hi", {"stop": [str(i) for i in range(17)]}, "at most 16 stop strings, not 17"),
    ("a stop string of 513 characters", "hi", {"stop": ["x" * 513]}, "a stop string of 513 characters"),
    ("an empty prompt", "", {}, "the prompt is empty"),
]


@pytest.mark.parametrize(("prompt", "kwargs", "phrase"), [r[1:] for r in GENERATE_ROWS],
                         ids=[r[0] for r in GENERATE_ROWS])
def test_bad_generation_arguments_are_one_line(good: Path, prompt: Any, kwargs: dict[str, Any], phrase: str) -> None:
    model, tokenizer = qwen_mlx.load(good)
    with pytest.raises(QwenMLXError, match=phrase) as error:
        qwen_mlx.generate(model, tokenizer, prompt, **{"max_tokens": 1, **kwargs})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("seed", [-1, 2**70])
def test_any_integer_is_a_seed(good: Path, seed: int) -> None:
    model, tokenizer = qwen_mlx.load(good)
    run = [qwen_mlx.generate(model, tokenizer, "hi", temperature=1.0, seed=seed, max_tokens=6).tokens
           for _ in range(2)]
    assert run[0] == run[1]


# --- the command line ---

def run_cli(*args: str, stdin: bytes = b"", limit_file_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    """`qwen-mlx ARGS` in a subprocess; `limit_file_bytes` makes every file it writes hit a full disk there."""

    def full_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    argv = [os.fsencode(a) for a in (sys.executable, "-m", "qwen_mlx.cli", *args)]
    out = subprocess.run(argv, input=stdin, capture_output=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=full_disk if limit_file_bytes else None)
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(errors="replace"),
                                       out.stderr.decode(errors="replace"))


def assert_one_line(result: subprocess.CompletedProcess[str], phrase: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qwen-mlx: error: ") and phrase in last, last


def test_invalid_utf8_on_the_command_line_and_on_stdin(good: Path) -> None:
    assert_one_line(run_cli("generate", "--model", str(good), "--prompt", os.fsdecode(b"caf\xe9")), "not valid UTF-8")
    assert_one_line(run_cli("generate", "--model", str(good), "--prompt", "-", stdin=b"caf\xe9 au lait"),
                    "stdin is not valid UTF-8")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_flag_is_refused(good: Path, prompt: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["generate", "--model", str(good), "--prompt", prompt])
    assert "--prompt is empty" in one_line_error(capsys, code)


# --- prompt-cache files ---

@pytest.fixture(scope="module")
def saved_cache(good: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache") / "doc.safetensors"
    assert cli.main(["cache-prompt", "--model", str(good), "--prompt", "a document", "--output", str(path)]) == 0
    return path


def resave(target: Path, arrays: dict[str, mx.array], header: dict[str, str]) -> None:
    """Save a hand-edited cache with its checksum made anew, so the check under test is the one that speaks."""
    checksum = cache_checksum(arrays, header["layers"], header["tokens"])
    mx.save_safetensors(str(target), arrays, {**header, "checksum": checksum})


def rewrite_cache(path: Path, target: Path, **header: str) -> None:
    arrays, meta = mx.load(str(path), return_metadata=True)
    resave(target, arrays, {**meta, **header})


def halve_the_head_size(path: Path, target: Path) -> None:
    arrays, meta = mx.load(str(path), return_metadata=True)
    resave(target, {k: v[..., : v.shape[-1] // 2] for k, v in arrays.items()}, meta)


def zero_the_arrays(path: Path, target: Path) -> None:
    arrays, meta = mx.load(str(path), return_metadata=True)
    mx.save_safetensors(str(target), {k: mx.zeros_like(v) for k, v in arrays.items()}, meta)


def only_the_format_tag(path: Path, target: Path) -> None:
    mx.save_safetensors(str(target), {"x": mx.zeros((1,))}, {"format": "qwen-mlx-prompt-cache"})


def drop_a_layer(path: Path, target: Path) -> None:
    arrays, meta = mx.load(str(path), return_metadata=True)
    layers = json.loads(meta["layers"])[:1]
    resave(target, {k: v for k, v in arrays.items() if k.startswith("layers.0.")},
           {**meta, "layers": json.dumps(layers)})


PROMPT_CACHE_ROWS: list[tuple[str, Callable[[Path, Path], None], str]] = [
    ("only the format tag", only_the_format_tag, "a damaged prompt cache"),
    ("layers not JSON", lambda p, t: rewrite_cache(p, t, layers="[{not json"), "a damaged prompt cache"),
    ("an unknown layer type", lambda p, t: rewrite_cache(p, t, layers='[{"type": "MagicCache", "offset": 3}]'),
     "no known cache type"),
    ("metadata a list", lambda p, t: rewrite_cache(p, t, metadata="[1, 2]"), "its metadata or token list"),
    ("arrays of another model", drop_a_layer, "made with another model"),
    ("tokens not matching the arrays", lambda p, t: rewrite_cache(p, t, tokens="[1, 2, 3]"),
     "does not match its arrays"),
    ("arrays zeroed", zero_the_arrays, "do not match their checksum"),
    ("keys of another head size", halve_the_head_size, "head size"),
    ("another model's weights", lambda p, t: rewrite_cache(p, t, metadata=json.dumps({
        **json.loads(mx.load(str(p), return_metadata=True)[1]["metadata"]), "model_fingerprint": "0" * 32})),
     "made with other weights"),
]


@pytest.mark.parametrize(("damage", "phrase"), [r[1:] for r in PROMPT_CACHE_ROWS],
                         ids=[r[0] for r in PROMPT_CACHE_ROWS])
def test_a_bad_prompt_cache_file_is_one_line(good: Path, saved_cache: Path, tmp_path: Path,
                                             damage: Callable[[Path, Path], None], phrase: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    damaged = tmp_path / "damaged.safetensors"
    damage(saved_cache, damaged)
    code = cli.main(["generate", "--model", str(good), "--prompt-cache", str(damaged), "--prompt", "x"])
    assert phrase in one_line_error(capsys, code)


def test_a_quantized_prompt_cache_of_another_head_size_is_one_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_tiny_qwen2(tmp_path / "model", hidden_size=128)  # a head size of 32: one 32-value group
    model, _ = qwen_mlx.load(folder)
    cache = qwen_mlx.PromptCache.new(model, qwen_mlx.CacheSettings(kv_bits=8, kv_group_size=32))
    cache.prefill(model, [1, 2, 3])
    saved = tmp_path / "quantized.safetensors"
    qwen_mlx.save_prompt_cache(saved, cache, prompt_cache_metadata(str(folder), model, []))
    halve_the_head_size(saved, tmp_path / "damaged.safetensors")
    code = cli.main(["generate", "--model", str(folder), "--prompt-cache", str(tmp_path / "damaged.safetensors"),
                     "--prompt", "x"])
    assert "damaged.safetensors: the prompt cache's keys in layer 0 hold" in one_line_error(capsys, code)


def test_a_prompt_cache_made_with_other_weights_of_the_same_shape_is_refused(
    saved_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = save_tiny_qwen2(tmp_path / "other", seed=9)  # the same shape, other weights
    code = cli.main(["generate", "--model", str(other), "--prompt-cache", str(saved_cache), "--prompt", "x"])
    assert "made with other weights" in one_line_error(capsys, code)


def test_cache_flags_with_a_prompt_cache_are_refused_not_ignored(good: Path, saved_cache: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["generate", "--model", str(good), "--prompt-cache", str(saved_cache), "--prompt", "x",
                     "--max-kv-size", "64"])
    assert "--prompt-cache keeps the cache" in one_line_error(capsys, code)


@pytest.mark.parametrize(("output", "phrase"), [("missing/doc.safetensors", "no such folder"),
                                                (".", "is a folder")])
def test_cache_prompt_output_mistakes(good: Path, tmp_path: Path, output: str, phrase: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["cache-prompt", "--model", str(good), "--prompt", "doc", "--output", str(tmp_path / output)])
    assert phrase in one_line_error(capsys, code)


def test_cache_prompt_onto_a_full_disk_is_one_line_and_leaves_nothing(good: Path, tmp_path: Path) -> None:
    target = tmp_path / "doc.safetensors"
    result = run_cli("cache-prompt", "--model", str(good), "--prompt", "a document " * 50, "--output", str(target),
                     limit_file_bytes=4096)
    assert_one_line(result, "cannot write the prompt cache")
    assert list(tmp_path.iterdir()) == []


# --- the converter ---

def test_convert_onto_a_full_disk_keeps_the_old_target(good: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    assert run_cli("convert", "--hf-path", str(good), "--mlx-path", str(target)).returncode == 0
    before = sorted((p.name, p.stat().st_size) for p in target.iterdir())
    result = run_cli("convert", "--hf-path", str(good), "--mlx-path", str(target), "-q", "--force",
                     limit_file_bytes=20_000)
    assert_one_line(result, "writing failed")
    assert sorted((p.name, p.stat().st_size) for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_killed_conversions_leftovers_are_tidied_by_the_next_run(good: Path, tmp_path: Path) -> None:
    stale = tmp_path / ".out.dead.tmp"
    stale.mkdir()
    (stale / ".converting").write_text("999999999")  # a pid no process has
    (stale / "model.safetensors").write_bytes(b"half")
    assert run_cli("convert", "--hf-path", str(good), "--mlx-path", str(tmp_path / "out")).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(("mlx_path", "phrase"), [("", "--mlx-path is empty"),
                                                  (".", "holds files that are not a model"),
                                                  ("~", "holds files that are not a model")])
def test_force_never_replaces_a_folder_that_is_not_a_model(good: Path, tmp_path: Path, mlx_path: str, phrase: str,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(home)
    monkeypatch.setenv("HOME", str(home))
    code = cli.main(["convert", "--hf-path", str(good), "--mlx-path", mlx_path, "--force"])
    assert phrase in one_line_error(capsys, code)
    assert [p.name for p in home.iterdir()] == ["thesis.tex"]


# --- the server ---

@pytest.fixture(scope="module")
def server(tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(["serve", "--model", str(tiny_model_dir("tiny-qwen", max_position_embeddings=1024)),
                            "--port", str(port)], f"{url}/health", tmp_path_factory.mktemp("logs") / "serve.log")
    yield url
    stop_server(process)


USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
FLAT_TOOL = {"type": "function", "name": "f", "parameters": {"type": "object"}}


def responses_row(name: str, body: dict[str, Any], param: str,
                  phrase: str) -> tuple[str, str, dict[str, Any], str, str]:
    return f"responses: {name}", "/v1/responses", {"input": "hi", "max_output_tokens": 2, **body}, param, phrase


def nested(levels: int) -> str:
    return '{"a": ' * levels + "1" + "}" * levels


RESPONSES_ROWS = [
    responses_row("input a number", {"input": 5}, "input", "input must be a string or a non-empty list"),
    responses_row("input null", {"input": None}, "input", "input must be a string or a non-empty list"),
    responses_row("input an empty list", {"input": []}, "input", "non-empty list"),
    responses_row("an item null", {"input": [None]}, "input", "item type None is not supported"),
    responses_row("an unknown item", {"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input",
                  "'web_search_call' is not supported"),
    responses_row("an unknown field on a message", {"input": [{"role": "user", "content": "hi", "color": "red"}]},
                  "input", "input[0].color is not supported"),
    responses_row("a role that is a list", {"input": [{"role": ["user"], "content": "hi"}]}, "input",
                  "role must be one of"),
    responses_row("a part type that is an object", {"input": [{"role": "user", "content": [{"type": {}}]}]},
                  "input", "content part type {} is not supported"),
    responses_row("a part's text a number", {"input": [{"role": "user", "content": [{"type": "input_text",
                                                                                      "text": 5}]}]},
                  "input", "text must be a string"),
    responses_row("call arguments not JSON", {"input": [{"type": "function_call", "call_id": "c", "name": "f",
                                                         "arguments": "{oops"}]}, "input",
                  "arguments must be a JSON object"),
    responses_row("call arguments nested 100 deep", {"input": [{"type": "function_call", "call_id": "c",
                                                                "name": "f", "arguments": nested(100)}]},
                  "input", "nested more than 64 levels"),
    responses_row("call arguments nested 100k deep", {"input": [{"type": "function_call", "call_id": "c",
                                                                 "name": "f", "arguments": nested(100_000)}]},
                  "input", "arguments must be a JSON object"),
    responses_row("a call output without its call_id", {"input": [{"type": "function_call_output",
                                                                   "output": "x"}]}, "input", "needs the call_id"),
    responses_row("a call output a number", {"input": [{"type": "function_call_output", "call_id": "c",
                                                        "output": 5}]}, "input", "output must be a string"),
    responses_row("a lone surrogate", {"input": "caf\udce9"}, "input", "not valid UTF-8"),
    responses_row("instructions a list", {"instructions": ["be brief"]}, "instructions", "must be a string"),
    responses_row("max_output_tokens 10**30", {"max_output_tokens": 10**30}, "max_output_tokens",
                  "max_output_tokens must be an integer from 1 to"),
    responses_row("max_output_tokens a string", {"max_output_tokens": "5"}, "max_output_tokens",
                  "max_output_tokens must be an integer"),
    responses_row("temperature 1e308", {"temperature": 1e308}, "temperature", "between 0 and 2"),
    responses_row("temperature a word", {"temperature": "hot"}, "temperature", "temperature"),
    responses_row("top_p 7", {"top_p": 7}, "top_p", "top_p"),
    responses_row("seed a float", {"seed": 1.5}, "seed", "seed must be an integer"),
    responses_row("tools an object", {"tools": FLAT_TOOL}, "tools", "tools must be a list"),
    responses_row("tools in the chat shape", {"tools": [TOOL]}, "tools", "tools[0].function is not supported"),
    responses_row("parameters a string", {"tools": [{**FLAT_TOOL, "parameters": "x"}]}, "tools",
                  "parameters as an object"),
    responses_row("tool_choice a number", {"tools": [FLAT_TOOL], "tool_choice": 5}, "tool_choice",
                  "tool_choice 5 must be"),
    responses_row("tool_choice required without tools", {"tool_choice": "required"}, "tool_choice",
                  "tool_choice needs tools"),
    responses_row("text a string", {"text": "json"}, "text", "text must be"),
    responses_row("a schema without a name", {"text": {"format": {"type": "json_schema", "schema": {}}}},
                  "text.format", "needs a name and a schema"),
    responses_row("a schema that is a list", {"text": {"format": {"type": "json_schema", "name": "x",
                                                                  "schema": []}}}, "text.format",
                  "needs a name and a schema"),
    responses_row("metadata of numbers", {"metadata": {"a": 1}}, "metadata", "metadata must map"),
    responses_row("metadata of 17 keys", {"metadata": {str(i): "x" for i in range(17)}}, "metadata",
                  "at most 16 keys"),
    responses_row("previous_response_id a number", {"previous_response_id": 5}, "previous_response_id",
                  "must be a string"),
    responses_row("stream yes", {"stream": "yes"}, "stream", "stream must be true or false"),
    responses_row("store no", {"store": "no"}, "store", "store must be true or false"),
    responses_row("parallel_tool_calls 1", {"tools": [FLAT_TOOL], "parallel_tool_calls": 1}, "parallel_tool_calls",
                  "must be true or false"),
    responses_row("include true", {"include": True}, "include", "'include' = True is not supported"),
    responses_row("an unknown field", {"frobnicate": 1}, "frobnicate", "parameter 'frobnicate' is not supported"),
    responses_row("model null", {"model": None}, "model", "model is required"),
]
SERVER_ROWS: list[tuple[str, str, dict[str, Any], str, str]] = [
    ("tools of strings", "/v1/chat/completions", {"messages": USER, "tools": ["x"]}, "tools", "each tool"),
    ("tool_choice function a string", "/v1/chat/completions",
     {"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": "f"}}, "tool_choice",
     "tool_choice must be"),
    ("tool_calls a number", "/v1/chat/completions",
     {"messages": [{"role": "assistant", "content": "", "tool_calls": 5}]}, "messages", "tool_calls must be a list"),
    ("a lone surrogate", "/v1/completions", {"prompt": "caf\udce9"}, "prompt", "not valid UTF-8"),
    ("a bad top_p after a good temperature", "/v1/chat/completions",
     {"messages": USER, "temperature": 0.5, "top_p": 7}, "top_p", "top_p"),
    ("temperature NaN", "/v1/chat/completions", {"messages": USER, "temperature": math.nan}, "temperature", "finite"),
    ("max_tokens a string", "/v1/chat/completions", {"messages": USER, "max_tokens": "5"}, "max_tokens",
     "max_tokens must be an integer"),
    ("an unknown role", "/v1/chat/completions", {"messages": [{"role": "usr", "content": "hi"}]}, "messages",
     "needs a role"),
    *RESPONSES_ROWS,
]


SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4) | st.dictionaries(
    st.sampled_from(["type", "role", "content", "text", "name", "arguments", "call_id", "output", "format",
                     "schema", "effort", "parameters", "x"]), children, max_size=4), max_leaves=20)
RESPONSES_FIELDS = ["input", "instructions", "temperature", "top_p", "seed", "tools", "tool_choice",
                    "parallel_tool_calls", "text", "metadata", "user", "store", "previous_response_id", "stream",
                    "stream_options", "include", "truncation", "reasoning", "background", "service_tier"]


@pytest.mark.parametrize(("path", "body", "param", "phrase"), [r[1:] for r in SERVER_ROWS],
                         ids=[r[0] for r in SERVER_ROWS])
def test_bad_requests_are_400s_naming_the_field(server: str, path: str, body: dict[str, Any], param: str,
                                                phrase: str) -> None:
    raw = json.dumps({"model": "tiny-qwen", **body}, ensure_ascii=True)  # keeps a lone surrogate as \\udce9
    response = httpx.post(f"{server}{path}", content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and phrase in error["message"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(RESPONSES_FIELDS), JSON, max_size=5))
def test_no_responses_body_gets_a_500(server: str, body: dict[str, Any]) -> None:
    """Random values in the Responses API's fields: whatever they are, an answer (a 4xx in OpenAI's shape, or a
    reply), never a 500."""
    body = {"model": "tiny-qwen", "input": "hi", **body, "max_output_tokens": 2}  # a valid body answers quickly
    response = httpx.post(f"{server}/v1/responses", json=body, timeout=60)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
