"""The web UI's logic without a browser or a server: markdown preparation, alternatives, saved files, the context's
limit and attachments. (The page itself is tested in test_webui_browser.py.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from qwen_mlx.text.tokenizer import Tokenizer
from qwen_mlx.webui import branches
from qwen_mlx.webui.attachments import MAX_BYTES, AttachmentError, read_attachment, with_attachments
from qwen_mlx.webui.chat import ChatApp
from qwen_mlx.webui.context import DROP_OLDEST, STOP, fit, model_messages, prompt_ids
from qwen_mlx.webui.conversations import Conversation, ConversationStore, new_id, owner_token, token_owner
from qwen_mlx.webui.rendering import chat_view, inline_math, split_thinking, stats_line, without_thinking


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("it costs $5 and the other costs $10", "it costs $5 and the other costs $10"),
        ("$1,599 … $499", "$1,599 … $499"),
        ("between $5-$10 a day", "between $5-$10 a day"),
        ("the area is $x^2$ here", "the area is \\(x^2\\) here"),
        ("$a_1 + b$ and $5", "\\(a_1 + b\\) and $5"),
        ("a price $5 and then $x$", "a price $5 and then \\(x\\)"),
        ("display $$E = mc^2$$ stays", "display $$E = mc^2$$ stays"),
        ("escaped \\$x$ is not math", "escaped \\$x$ is not math"),
        ("`$x$` in code", "`$x$` in code"),
        ("```\n$x$\n```\n$y$", "```\n$x$\n```\n\\(y\\)"),
        ("unclosed fence\n```sh\necho $HOME $PATH", "unclosed fence\n```sh\necho $HOME $PATH"),
    ],
)
def test_single_dollars_are_math_only_where_pandoc_says_so(text: str, expected: str) -> None:
    assert inline_math(text) == expected


def test_thinking_is_split_from_the_answer_and_left_out_of_the_next_prompt() -> None:
    assert split_thinking("<think>\nweigh it\n</think>\n\nYes.") == ("weigh it", True, "Yes.")
    assert split_thinking("<think>still weighing") == ("still weighing", False, "")
    assert split_thinking("weighed</think>Yes.") == ("weighed", True, "Yes.")  # the template opened the block
    assert split_thinking("No tags.") == (None, True, "No tags.")
    assert without_thinking("<think>a</think>b") == "b"
    assert without_thinking("<think>cut off") == ""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x</think>answer"}]
    assert model_messages(messages)[1]["content"] == "answer"


def test_stats_name_the_cache_and_tell_a_full_context_from_max_tokens() -> None:
    stats = {"prompt_tokens": 40, "prefilled_tokens": 5, "generation_tokens": 3, "time_to_first_token": 0.1,
             "generation_tps": 9.0, "context_tokens": 43, "context_length": 512}
    assert "prompt 40 tokens (35 from cache)" in stats_line(stats)
    assert stats_line({**stats, "finish_reason": "length"}).endswith("max tokens reached")
    full = {**stats, "context_tokens": 511, "finish_reason": "length"}
    assert stats_line(full).endswith("context full")


def test_alternatives_keep_what_an_edit_or_a_regeneration_replaced() -> None:
    root = branches.new_root()
    for role, text in [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]:
        branches.append(root, {"role": role, "content": text})
    branches.add_alternative(root, 3, {"role": "assistant", "content": "a2 again"})
    assert [m["content"] for m in branches.path(root)] == ["q1", "a1", "q2", "a2 again"]
    assert branches.positions(root)[3] == (2, 2)
    branches.add_alternative(root, 2, {"role": "user", "content": "q2 edited"})
    assert [m["content"] for m in branches.path(root)] == ["q1", "a1", "q2 edited"]
    assert branches.switch(root, 2, -1)
    assert [m["content"] for m in branches.path(root)] == ["q1", "a1", "q2", "a2 again"]  # its own last reply
    assert not branches.switch(root, 2, -1)  # already the first
    rows, meta = chat_view(Conversation(tree=root))
    assert [m.branch for m in meta] == [None, None, (1, 2), (2, 2)]
    assert all("‹" not in r["content"] for r in rows), "the arrows are not part of the markdown"


def test_a_conversation_file_of_the_wrong_shape_is_skipped_and_logged(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    store = ConversationStore(tmp_path)
    owner = new_id()
    good = Conversation(owner)
    branches.append(good.tree, {"role": "user", "content": "still here"})
    store.save(good)
    folder = tmp_path / owner
    bad = {
        "list.json": "[1, 2]",
        "messages.json": json.dumps({"messages": "not a list", "updated": 1}),
        "updated.json": json.dumps({"messages": [{"role": "user", "content": "x"}], "updated": "yesterday"}),
        "role.json": json.dumps({"messages": [{"role": "wizard", "content": "x"}], "updated": 1}),
        "truncated.json": '{"nodes": [{"role": "user", "content": "x", "par',
        "orphan.json": json.dumps({"nodes": [{"role": "user", "content": "x", "parent": 3}], "updated": 1}),
        "binary.json": "\udcff",
    }
    for i, text in enumerate(bad.values()):
        (folder / f"{i:032x}.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    with caplog.at_level(logging.WARNING):
        listed = store.list(owner)
        store.list(owner)  # the same files again: reported once
    assert [s.title for s in listed] == ["still here"]
    skipped = [r for r in caplog.records if "skipping the conversation file" in r.getMessage()]
    assert len(skipped) == len(bad)
    assert store.load(owner, f"{1:032x}") is None and store.load(owner, good.id) is not None


class NoModels:
    """A page's models when none is on this machine (what `ChatApp.restore` asks of them)."""

    def info(self, name: str | None) -> None:
        return None

    def choices(self) -> list[str]:
        return []

    def name_of(self, name: str | None) -> None:
        return None


def test_a_browser_is_known_only_by_an_owner_token_this_server_signed(tmp_path: Path) -> None:
    """An owner id alone (it shows in an export's path) or one signed with another key opens nothing: that browser
    is a new one."""
    store = ConversationStore(tmp_path)
    victim = Conversation(new_id())
    branches.append(victim.tree, {"role": "user", "content": "my secret plans"})
    store.save(victim)
    app = ChatApp(NoModels(), store, owner_secret="server key")  # type: ignore[arg-type]

    def restored(token: object) -> tuple[str, Conversation]:
        token, conversation, *_ = app.restore(token, None)
        return token, conversation

    token, conversation = restored(owner_token(victim.owner, "server key"))
    assert conversation.owner == victim.owner and conversation.id == victim.id
    assert token_owner(token, "server key") == victim.owner
    for forged in (victim.owner, owner_token(victim.owner, "another key"), f"{victim.owner}.{'0' * 64}",
                   f"{victim.owner}.é", None, 5):
        token, conversation = restored(forged)
        assert conversation.owner != victim.owner and not conversation.messages
        assert token_owner(token, "server key") == conversation.owner


def test_conversations_saved_before_alternatives_still_open(tmp_path: Path) -> None:
    owner, cid = new_id(), new_id()
    (tmp_path / owner).mkdir()
    old = {"owner": owner, "id": cid, "updated": 5.0,
           "messages": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "reply", "stats": {}}]}
    (tmp_path / owner / f"{cid}.json").write_text(json.dumps(old))
    conversation = ConversationStore(tmp_path).load(owner, cid)
    assert [m["content"] for m in conversation.messages] == ["old", "reply"]
    assert conversation.system_prompt is None  # the model's default, as it was sent then


def test_an_empty_system_prompt_sends_no_system_message(qwen_tokenizer_dir: Path) -> None:
    tokenizer = Tokenizer.from_folder(qwen_tokenizer_dir)
    turns = [{"role": "user", "content": "hi"}]
    text = tokenizer.decode(prompt_ids(tokenizer, "", turns))
    assert "system" not in text and "You are Qwen" not in text and text.startswith("<|im_start|>user")
    assert "Be brief." in tokenizer.decode(prompt_ids(tokenizer, "Be brief.", turns))


def test_a_full_context_drops_the_oldest_turns_or_stops(qwen_tokenizer_dir: Path) -> None:
    tokenizer = Tokenizer.from_folder(qwen_tokenizer_dir)
    turns = []
    for i in range(8):
        turns += [{"role": "user", "content": f"question {i} " + "word " * 40},
                  {"role": "assistant", "content": f"answer {i} " + "word " * 40}]
    turns.append({"role": "user", "content": "the last question"})
    whole = len(prompt_ids(tokenizer, "System.", turns))
    fitted = fit(tokenizer, "System.", turns, context_length=whole // 2, max_tokens=32, policy=DROP_OLDEST)
    assert fitted.error is None and fitted.dropped > 0 and len(fitted.ids) + 32 <= whole // 2
    text = tokenizer.decode(fitted.ids)
    assert text.startswith("<|im_start|>system\nSystem.") and "the last question" in text
    assert "question 0 " not in text
    stopped = fit(tokenizer, "System.", turns, context_length=whole // 2, max_tokens=32, policy=STOP)
    assert stopped.error and "start a new chat" in stopped.error
    alone = fit(tokenizer, "System.", [{"role": "user", "content": "word " * 400}], 64, 8, DROP_OLDEST)
    assert alone.error and "context is 64" in alone.error


def test_attachments_are_text_with_limits_and_cannot_close_their_fence(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("a ``` fence\ninside", encoding="utf-8")
    attachment = read_attachment(tmp_path / "notes.md")
    prompt = with_attachments("Look:", [attachment.as_dict()])
    assert prompt.startswith("Look:\n\nFile `notes.md`:\n````\na ``` fence\ninside\n````")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    with pytest.raises(AttachmentError, match="photo.png is not a text file"):
        read_attachment(tmp_path / "photo.png")
    (tmp_path / "huge.log").write_bytes(b"x" * (MAX_BYTES + 1))
    with pytest.raises(AttachmentError, match="huge.log is .* limited to 512 kB each"):
        read_attachment(tmp_path / "huge.log")
    (tmp_path / "utf16.txt").write_bytes("héllo".encode("utf-16"))
    assert read_attachment(tmp_path / "utf16.txt").text == "héllo"


def test_only_a_reply_cut_off_by_the_server_is_marked_interrupted() -> None:
    conversation = Conversation(tree=branches.linear([
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "imported, no statistics"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "half a rep", "unfinished": True},
    ]))
    _, meta = chat_view(conversation)
    assert meta[1].footer == "" and not meta[1].warn
    assert meta[3].footer.startswith("interrupted") and meta[3].warn


def test_a_conversation_thousands_of_messages_long_with_alternatives_saves_and_opens(tmp_path: Path) -> None:
    """A file holds the tree flat: nested, JSON (and Python's recursion) would give up a few hundred deep."""
    store = ConversationStore(tmp_path)
    conversation = Conversation(new_id())
    for i in range(3000):
        branches.append(conversation.tree, {"role": ("user", "assistant")[i % 2], "content": f"message {i}"})
    branches.add_alternative(conversation.tree, 1, {"role": "assistant", "content": "another first reply"})
    branches.switch(conversation.tree, 1, -1)
    store.save(conversation)
    loaded = store.load(conversation.owner, conversation.id)
    assert [m["content"] for m in loaded.messages] == [f"message {i}" for i in range(3000)]
    assert branches.positions(loaded.tree)[1] == (1, 2)
    branches.switch(loaded.tree, 1, 1)
    assert [m["content"] for m in loaded.messages] == ["message 0", "another first reply"]


def test_a_reply_whose_template_opened_the_thinking_block_streams_as_a_thinking_block() -> None:
    """DeepSeek-R1-Distill's template ends the prompt with "<think>\\n": the reply only closes the block."""
    from types import SimpleNamespace

    from qwen_mlx.engine.generate import GenerationChunk, GenerationStats
    from qwen_mlx.engine.worker import Job
    from qwen_mlx.webui.reply import LiveReply

    conversation = Conversation()
    branches.append(conversation.tree, {"role": "user", "content": "2 + 2?"})
    message = branches.append(conversation.tree, {"role": "assistant", "content": "", "pending": True})
    job = Job("s", None)
    job.started.set()
    worker = SimpleNamespace(active=1, max_batch=1)
    reply = LiveReply(conversation, message, job, worker, prompt_tokens=10, dropped=0, opens_thinking=True,
                      ahead=lambda: 0)
    for text in ("Two and two", " make four.", "</think>", "4"):
        job.put(GenerationChunk(text, 1))
        reply.pump(until=0)
        if text == " make four.":
            rows, _ = chat_view(conversation, live={id(message)})
            assert rows[1]["metadata"] == {"title": "Thinking", "status": "pending"}
            assert rows[1]["content"] == "Two and two make four." and rows[2]["content"] == "…"
    job.put(GenerationChunk("", None, "stop", GenerationStats(prompt_tokens=10, generation_tokens=4)))
    reply.pump(until=0)
    rows, meta = chat_view(conversation)
    assert rows[1]["metadata"]["status"] == "done" and rows[2]["content"] == "4"
    assert meta[2].footer.startswith("prompt 10 tokens")
    assert model_messages(conversation.messages)[1] == {"role": "assistant", "content": "4"}
