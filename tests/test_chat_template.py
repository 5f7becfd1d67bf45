"""Qwen2.5-Instruct's chat template renders byte for byte as transformers renders it; ChatML without one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwen_mlx.text.tokenizer import Tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city, in °C.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. 北京 or Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time of a timezone.",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS: dict[str, tuple[list[dict], list[dict] | None]] = {
    "single_user_turn": ([{"role": "user", "content": "Hello! Who are you?"}], None),
    "system_and_multi_turn": (
        [
            {"role": "system", "content": "You are a terse assistant. Answer in one line."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "用中文回答：天空为什么是蓝色的？"},
            {"role": "assistant", "content": "因为瑞利散射。"},
            {"role": "user", "content": "Thanks 👍\n\nAnd the sunset?"},
        ],
        None,
    ),
    "tools_without_system": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER_TOOL, TIME_TOOL]),
    "tools_calls_and_several_tool_responses": (
        [
            {"role": "system", "content": "You can look things up."},
            {"role": "user", "content": "Weather and time in Paris and Tokyo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    _call("get_weather", {"city": "Paris"}),
                    _call("get_weather", {"city": "東京", "unit": "celsius"}),
                    _call("get_time", {"tz": "Europe/Paris"}),
                ],
            },
            {"role": "tool", "content": '{"temperature": 18, "sky": "cloudy"}'},
            {"role": "tool", "content": '{"temperature": 24, "sky": "晴れ"}'},
            {"role": "tool", "content": "14:05"},
            {"role": "assistant", "content": "Paris: 18 °C, cloudy, 14:05. Tokyo: 24 °C, sunny."},
            {"role": "user", "content": "And Berlin?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [_call("get_weather", {"city": "Berlin"})]},
            {"role": "tool", "content": '{"temperature": 15}'},
        ],
        [WEATHER_TOOL, TIME_TOOL],
    ),
}


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


def test_the_fixture_folder_carries_the_official_template(tokenizer: Tokenizer, reference_dir: Path) -> None:
    reference = json.loads((reference_dir / "tokenizer_config.json").read_text())
    assert tokenizer.chat_template == reference["chat_template"]


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["generation_prompt", "no_generation_prompt"])
@pytest.mark.parametrize("name", CONVERSATIONS.keys())
def test_rendering_matches_transformers_byte_for_byte(tokenizer: Tokenizer, hf_tokenizer, name: str,
                                                      add_generation_prompt: bool) -> None:
    messages, tools = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert tokenizer.apply_chat_template(messages, tools, add_generation_prompt=add_generation_prompt) == expected


def test_single_user_turn_gets_the_templates_default_system_prompt(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    text = tokenizer.apply_chat_template(messages)
    with_explicit_system = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, *messages])
    default_system = text.split("<|im_end|>")[0].removeprefix("<|im_start|>system\n")
    assert default_system and "Qwen" in default_system
    assert text == with_explicit_system.replace("\nS<|im_end|>", f"\n{default_system}<|im_end|>", 1)
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")


def test_generation_prompt_is_the_only_difference(tokenizer: Tokenizer) -> None:
    messages, tools = CONVERSATIONS["system_and_multi_turn"]
    with_prompt = tokenizer.apply_chat_template(messages, tools, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(messages, tools, add_generation_prompt=False)
    assert with_prompt == without + "<|im_start|>assistant\n"


@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["generation_prompt", "no_generation_prompt"])
@pytest.mark.parametrize("name", CONVERSATIONS.keys())
def test_tokenized_rendering_matches_transformers_ids(tokenizer: Tokenizer, hf_tokenizer, name: str,
                                                      add_generation_prompt: bool) -> None:
    messages, tools = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    ids = tokenizer.apply_chat_template(messages, tools, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == expected


def _chatml(messages: list[dict], add_generation_prompt: bool) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.mark.parametrize("config", ["no_tokenizer_config", "tokenizer_config_without_template"])
def test_folder_without_a_template_falls_back_to_chatml(qwen_tokenizer_dir: Path, tmp_path: Path,
                                                         config: str) -> None:
    shutil.copyfile(qwen_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    if config == "tokenizer_config_without_template":
        tokenizer_config = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
        del tokenizer_config["chat_template"]
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer = Tokenizer.from_folder(tmp_path)
    messages = CONVERSATIONS["system_and_multi_turn"][0]
    for add_generation_prompt in (True, False):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == _chatml(messages, add_generation_prompt)
