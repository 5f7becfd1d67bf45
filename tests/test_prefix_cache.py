"""The process-wide prefix cache: shared prefixes across conversations, RAM and disk tiers that survive a restart,
checkpoints for rotating caches, replies kept as the ids they were generated as — and replies token for token
the same as without any of it."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import pytest
from hf_models import save_tiny_qwen2
from servers import free_port, start_server, stop_server

import qwen_mlx
from qwen_mlx import CacheSettings, PromptCache, QwenMLXError
from qwen_mlx.cli.terminal import prompt_cache_metadata, read_prompt_cache
from qwen_mlx.engine.prefix_cache import DiskTier, PrefixCache, ReplyMemory, read_tokens, settings_tag
from qwen_mlx.engine.worker import CacheTiers, ModelWorker
from qwen_mlx.store import weights
from qwen_mlx.store.synthetic import demo_model_folder
from qwen_mlx.store.weights import fingerprint, weight_files

GREEDY = {"temperature": 0, "repetition_penalty": 1.0, "max_tokens": 12}
SYSTEM = list(range(30, 130))  # a 100-token system prompt, or document
Loaded = tuple[Any, qwen_mlx.Tokenizer]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny"), seed=4, hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def tiny(tiny_folder: Path) -> Loaded:
    """The model with no end-of-turn id: every reply runs to max_tokens, so the turns' lengths are known."""
    model, tokenizer = qwen_mlx.load(tiny_folder)
    tokenizer.eos_token_ids = []
    return model, tokenizer


def run(tiny: Loaded, store: PrefixCache, prompt: list[int], **kwargs: Any) -> qwen_mlx.GenerationResult:
    """One request through `store`, as the worker runs it: acquire a cache, generate, release the turn."""
    cache = store.acquire(prompt)
    result = qwen_mlx.generate(*tiny, prompt, prompt_cache=cache, **{**GREEDY, **kwargs})
    store.release(cache)
    return result


def fresh(tiny: Loaded, prompt: list[int], **kwargs: Any) -> qwen_mlx.GenerationResult:
    return qwen_mlx.generate(*tiny, prompt, **{**GREEDY, **kwargs})


def disk_tier(model: Any, folder: Path, settings: CacheSettings | None = None,
              max_bytes: int = 1 << 30) -> DiskTier:
    tag = settings_tag(settings or CacheSettings())
    return DiskTier(folder / model.fingerprint / tag, model.fingerprint, tag, max_bytes)


def test_two_conversations_share_a_system_prompt_and_keep_their_own_turns(tiny: Loaded) -> None:
    model, _ = tiny
    store = PrefixCache(model, CacheSettings(), ram_bytes=1 << 30)
    a, b = SYSTEM + [200, 201, 202], SYSTEM + [210, 211]
    first_a = run(tiny, store, a)
    first_b = run(tiny, store, b)
    assert first_a.stats.prefilled_tokens == len(a)
    assert first_b.stats.prefilled_tokens == len(b) - len(SYSTEM)  # the system prompt computed once
    assert first_b.tokens == fresh(tiny, b).tokens
    next_a = a + first_a.tokens + [220, 221]
    again_a = run(tiny, store, next_a)
    assert again_a.stats.prefilled_tokens == 3  # a's turn is whole: its last reply token and the new message
    assert again_a.tokens == fresh(tiny, next_a).tokens
    stats = store.snapshot()
    assert (stats.hits, stats.misses, stats.reused_tokens) == (2, 1, len(SYSTEM) + len(next_a) - 3)


def test_ram_is_bounded_and_what_leaves_it_is_found_on_disk(tiny: Loaded, tmp_path: Path) -> None:
    model, _ = tiny
    one_turn = PromptCache.new(model)
    one_turn.prefill(model, SYSTEM)
    store = PrefixCache(model, CacheSettings(), ram_bytes=int(one_turn.nbytes * 1.5),
                        disk=disk_tier(model, tmp_path))
    conversations = [SYSTEM[:40] + [250 + i] * 50 for i in range(3)]
    replies = [run(tiny, store, c) for c in conversations]
    stats = store.snapshot()
    assert stats.ram_entries + stats.disk_entries == 3 and stats.disk_entries >= 1  # the oldest moved to disk
    assert stats.ram_bytes <= one_turn.nbytes * 1.5
    on_disk = next(i for i, c in enumerate(conversations)
                   if any(list(tokens) == c + replies[i].tokens[:-1] for tokens, _ in store.disk.index.values()))
    follow_up = conversations[on_disk] + replies[on_disk].tokens + [300]
    again = run(tiny, store, follow_up)
    assert again.stats.prefilled_tokens == 2 and store.snapshot().disk_hits == 1
    assert again.tokens == fresh(tiny, follow_up).tokens


def test_a_restart_resumes_a_conversation_from_disk(tiny: Loaded, tmp_path: Path) -> None:
    model, _ = tiny
    first_store = PrefixCache(model, CacheSettings(), ram_bytes=1 << 30, disk=disk_tier(model, tmp_path))
    prompt = SYSTEM + [250, 251]
    first = run(tiny, first_store, prompt)
    first_store.flush()  # shutdown

    restarted = PrefixCache(model, CacheSettings(), ram_bytes=1 << 30, disk=disk_tier(model, tmp_path))
    follow_up = prompt + first.tokens + [260, 261, 262]
    again = run(tiny, restarted, follow_up)
    assert again.stats.prefilled_tokens == 4
    assert again.tokens == fresh(tiny, follow_up).tokens


def test_a_cache_of_another_model_or_setting_is_never_applied(tiny: Loaded, tmp_path: Path) -> None:
    model, _ = tiny
    store = PrefixCache(model, CacheSettings(), ram_bytes=1 << 30, disk=disk_tier(model, tmp_path))
    run(tiny, store, SYSTEM + [1])
    store.flush()
    other = qwen_mlx.load(save_tiny_qwen2(tmp_path / "other", seed=9, hidden_size=128, intermediate_size=256))
    assert other[0].fingerprint != model.fingerprint  # the same shape, other weights
    theirs = PrefixCache(other[0], CacheSettings(), ram_bytes=1 << 30, disk=disk_tier(other[0], tmp_path))
    assert run(other, theirs, SYSTEM + [1]).stats.prefilled_tokens == len(SYSTEM) + 1
    quantized = CacheSettings(kv_bits=8, kv_group_size=32)
    ours_quantized = PrefixCache(model, quantized, ram_bytes=1 << 30, disk=disk_tier(model, tmp_path, quantized))
    assert run(tiny, ours_quantized, SYSTEM + [1], kv_bits=8, kv_group_size=32).stats.prefilled_tokens == \
        len(SYSTEM) + 1
    # A file planted in the right folder with another fingerprint inside is skipped, not read.
    ours = disk_tier(model, tmp_path)
    planted = next(iter(ours.index))
    arrays, meta = qwen_mlx.load_prompt_cache(planted)
    qwen_mlx.save_prompt_cache(planted, arrays, {**meta, "fingerprint": "f" * 32})
    assert DiskTier(ours.folder, ours.fingerprint, ours.tag, 1 << 30).read(planted) is None


def differ_late(folder: Path, into: Path) -> Path:
    """A copy of the model in `folder` with one byte of its weights changed, late in the file, where the old
    fingerprint (64 evenly spaced 4 KiB blocks) never looked."""
    shutil.copytree(folder, into)
    weights = into / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) * 64 // 65 - 64] ^= 0x40  # between the last two sampled blocks, in a weight's mantissa
    weights.write_bytes(data)
    return into


def test_models_of_one_shape_that_differ_in_one_late_block_share_no_cache(tiny: Loaded, tiny_folder: Path,
                                                                          tmp_path: Path) -> None:
    model, _ = tiny
    other = qwen_mlx.load(differ_late(tiny_folder, tmp_path / "other"))
    assert other[0].fingerprint != model.fingerprint
    ours = PrefixCache(model, CacheSettings(), ram_bytes=1 << 30, disk=disk_tier(model, tmp_path / "kv"))
    prompt = SYSTEM + [1]
    run(tiny, ours, prompt)
    ours.flush()
    theirs = PrefixCache(other[0], CacheSettings(), ram_bytes=1 << 30, disk=disk_tier(other[0], tmp_path / "kv"))
    assert theirs.disk.index == {} and run(other, theirs, prompt).stats.prefilled_tokens == len(prompt)
    saved = PromptCache.new(model)
    saved.prefill(model, SYSTEM)
    qwen_mlx.save_prompt_cache(tmp_path / "prompt.safetensors", saved, prompt_cache_metadata("tiny", model, []))
    with pytest.raises(QwenMLXError, match="other weights"):
        read_prompt_cache(str(tmp_path / "prompt.safetensors"), other[0])


def test_a_weight_files_digest_is_remembered_until_the_file_changes(tiny_folder: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = shutil.copytree(tiny_folder, tmp_path / "model")
    files, index = weight_files(folder), tmp_path / "fingerprints.json"
    first = fingerprint(folder, files, index)
    read, digest = [], weights.file_digest
    monkeypatch.setattr(weights, "file_digest", lambda path: read.append(path) or digest(path))
    assert fingerprint(folder, files, index) == first and read == []  # remembered: not read again
    original = files[0].read_bytes()
    changed = bytearray(original)
    changed[-1] ^= 1
    files[0].write_bytes(changed)  # the same size, in place: a new mtime
    assert fingerprint(folder, files, index) != first and read == files
    files[0].write_bytes(original)
    assert fingerprint(folder, files, index) == first  # the bytes, not the stamp, make the digest
    index.write_text("{damaged")
    assert fingerprint(folder, files, index) == first


def test_one_bound_for_the_whole_disk_tier_least_recently_used_out_first(tiny: Loaded, tmp_path: Path) -> None:
    model, _ = tiny
    caches = []
    for last in range(4):  # four entries of one size
        cache = PromptCache.new(model)
        cache.prefill(model, SYSTEM + [last])
        caches.append(cache)
    removed_model = "0" * 32  # the folder of a model since removed: nothing will ever read it again
    DiskTier(tmp_path / removed_model / "full", removed_model, "full", 1 << 30).write(caches[0])
    (tmp_path / removed_model / "replies.json").write_text("[]")
    quantized = disk_tier(model, tmp_path, CacheSettings(kv_bits=8, kv_group_size=32))
    quantized.write(caches[1])
    [old_entry], [quantized_entry] = (tmp_path / removed_model / "full").iterdir(), quantized.index
    now = time.time()
    os.utime(old_entry, (now - 3000, now - 3000))
    os.utime(quantized_entry, (now - 2000, now - 2000))
    (tmp_path / "notes").mkdir()  # not the disk tier's: never touched
    entry_bytes = quantized_entry.stat().st_size
    ours = disk_tier(model, tmp_path, max_bytes=int(entry_bytes * 2.5))
    assert old_entry.exists() and quantized_entry.exists()  # two entries fit
    ours.write(caches[2])
    assert not (tmp_path / removed_model).exists()  # the oldest out, then its model's folder
    assert quantized_entry.exists()
    ours.write(caches[3])
    assert not quantized_entry.exists() and len(ours.index) == 2  # another setting's folder counts too
    assert len(disk_tier(model, tmp_path, max_bytes=entry_bytes).index) == 1  # a smaller bound, kept from the start
    assert (tmp_path / "notes").exists()


def test_a_wrapped_rotating_cache_resumes_from_the_last_turns_checkpoint(tiny: Loaded) -> None:
    """Once it wraps it cannot be trimmed: regenerate, edit and the next turn start from the checkpoint each
    finished turn left, and regenerate gives the very reply the turn gave the first time."""
    model, _ = tiny
    settings = CacheSettings(max_kv_size=48, keep=4)
    store = PrefixCache(model, settings, ram_bytes=1 << 30)
    turn1 = SYSTEM[:60]
    reply1 = run(tiny, store, turn1, max_kv_size=48)
    turn2 = turn1 + reply1.tokens + [230, 231, 232]
    reply2 = run(tiny, store, turn2, max_kv_size=48)
    assert reply2.stats.prefilled_tokens == 4
    regenerated = run(tiny, store, turn2, max_kv_size=48)
    assert regenerated.stats.prefilled_tokens == 4  # from turn 1's checkpoint, not the whole 75 again
    assert regenerated.tokens == reply2.tokens
    edited = turn1 + reply1.tokens + [240, 241]
    assert run(tiny, store, edited, max_kv_size=48).stats.prefilled_tokens == 3


def test_a_file_a_killed_writer_left_is_never_read_as_a_cache(tiny: Loaded, tiny_folder: Path,
                                                              tmp_path: Path) -> None:
    model, _ = tiny
    folder = disk_tier(model, tmp_path).folder
    writer = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import mlx.core as mx
        import qwen_mlx
        from qwen_mlx.engine.prefix_cache import DiskTier
        model, _ = qwen_mlx.load({str(tiny_folder)!r})
        save = mx.save_safetensors
        def slow(path, arrays, metadata):
            save(path, arrays, metadata)
            with open(path, "r+b") as f:
                f.truncate(f.seek(0, 2) // 2)  # half written ...
            Path({str(tmp_path / "started")!r}).touch()
            time.sleep(60)  # ... when the kill comes
        mx.save_safetensors = slow
        cache = qwen_mlx.PromptCache.new(model)
        cache.prefill(model, list(range(1, 200)))
        DiskTier(Path({str(folder)!r}), model.fingerprint, "full", 1 << 30).write(cache)
    """)
    process = subprocess.Popen([sys.executable, "-c", writer])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline and process.poll() is None, "the writer did not get going"
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        process.kill()
    leftovers = list(folder.iterdir())
    assert leftovers and all(p.name.startswith(".") for p in leftovers)  # only the temporary file
    assert all(read_tokens(p) is None for p in leftovers)
    assert DiskTier(folder, model.fingerprint, "full", 1 << 30).index == {}


def poison(folder: Path, entry: bytes) -> list[str]:
    """Every kind of damage a disk-tier folder can hold, one a file; their names. `entry`: a whole entry's bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "seven-bytes.safetensors").write_bytes(b"\x07" * 7)
    (folder / "huge-length.safetensors").write_bytes(b"\xff" * 8 + os.urandom(4096))  # claims 2**64 - 1 bytes
    (folder / "random.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + os.urandom(4096))
    (folder / "truncated.safetensors").write_bytes(entry[: len(entry) // 2])
    mx.save_safetensors(str(folder / "foreign.safetensors"), {"w": mx.ones((4,))}, {"format": "mlx"})
    (folder / "a-folder.safetensors").mkdir()
    (folder / "dangling.safetensors").symlink_to(folder / "no-such-file")
    os.mkfifo(folder / "fifo.safetensors")
    return ["seven-bytes", "huge-length", "random", "truncated", "foreign", "a-folder", "dangling", "fifo"]


def test_a_damaged_disk_tier_never_keeps_the_worker_from_starting(tiny: Loaded, tiny_folder: Path,
                                                                  tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    model, _ = tiny
    whole = disk_tier(model, tmp_path / "whole")
    cache = PromptCache.new(model)
    cache.prefill(model, SYSTEM)
    whole.write(cache)
    entry = next(iter(whole.index))
    folder = disk_tier(model, tmp_path / "kv-cache").folder
    shutil.copy(entry, folder / entry.name)
    names = poison(folder, entry.read_bytes())
    worker = ModelWorker(lambda: qwen_mlx.load(tiny_folder), tiers=CacheTiers(1 << 30, tmp_path / "kv-cache", 1 << 30))
    try:
        assert worker.wait_loaded(60) and worker.load_error is None
        messages = [{"role": "user", "content": "hello"}]
        job = worker.submit("s", messages, temperature=0, max_tokens=4)
        chunks = [job.get(timeout=60)]
        while chunks[-1] is not None and chunks[-1].finish_reason is None:
            chunks.append(job.get(timeout=60))
        assert chunks[-1] is not None and chunks[-1].finish_reason == "length"
        assert list(worker.prefixes.disk.index) == [folder / entry.name]  # the whole entry is still found
        assert sorted(p.name for p in folder.iterdir()) == sorted(["damaged", entry.name])
        assert sorted(p.name.split("-", 1)[1] for p in (folder / "damaged").iterdir()) == \
            sorted(f"{name}.safetensors" for name in names)
    finally:
        worker.close()
    for name in names:  # each named once
        assert sum(f"{name}.safetensors" in r.getMessage() for r in caplog.records) == 1, name


def overwrite_data(path: Path, pattern: bytes) -> None:
    """Damage a cache file as a bad disk or a crash would: `pattern` over 4 KiB in the middle of its arrays,
    its header and size as they were."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    middle = (start + len(data)) // 2
    data[middle : middle + 4096] = (pattern * 4096)[:4096]
    path.write_bytes(data)


@pytest.mark.parametrize("pattern", [b"\0", struct.pack("<f", float("nan"))], ids=["zeroed", "nan"])
def test_a_corrupted_entry_is_refused_and_the_reply_is_the_uncached_one(tiny: Loaded, tmp_path: Path,
                                                                        pattern: bytes) -> None:
    model, _ = tiny
    store = PrefixCache(model, CacheSettings(), ram_bytes=1 << 30, disk=disk_tier(model, tmp_path))
    prompt = SYSTEM + [250, 251]
    first = run(tiny, store, prompt)
    store.flush()
    [entry] = store.disk.index
    overwrite_data(entry, pattern)
    restarted = PrefixCache(model, CacheSettings(), ram_bytes=1 << 30, disk=disk_tier(model, tmp_path))
    assert entry in restarted.disk.index  # its header is whole: found at start, refused once its arrays are read
    follow_up = prompt + first.tokens + [260]
    again = run(tiny, restarted, follow_up)
    assert again.stats.prefilled_tokens == len(follow_up)
    assert again.tokens == fresh(tiny, follow_up).tokens
    assert not entry.exists() and len(list((entry.parent / "damaged").iterdir())) == 1


def test_an_entry_reaches_the_disk_before_its_name_does(tiny: Loaded, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = tiny
    cache = PromptCache.new(model)
    cache.prefill(model, SYSTEM)
    tier = disk_tier(model, tmp_path)
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or replace(a, b))
    tier.write(cache)
    assert events == ["file", "rename", "folder"]


def test_a_reply_resent_as_text_matches_the_ids_it_was_generated_as(tiny: Loaded) -> None:
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "Tell me about the mill."}]
    first = qwen_mlx.generate(model, tokenizer, messages, **GREEDY)
    memory = ReplyMemory()
    memory.remember(first.text, first.tokens)
    prompt = tokenizer.apply_chat_template(messages, tokenize=True)
    follow_up = [*messages, {"role": "assistant", "content": first.text,
                             "token_ids": memory.ids_for(first.text)}, {"role": "user", "content": "And then?"}]
    ids = tokenizer.apply_chat_template(follow_up, tokenize=True)
    assert ids[: len(prompt) + len(first.tokens)] == prompt + first.tokens
    # Ids that do not spell the content are not used: the text is tokenized as it is.
    wrong = [*messages, {"role": "assistant", "content": first.text, "token_ids": [5, 6]}]
    assert tokenizer.apply_chat_template(wrong, tokenize=True) == tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": first.text}], tokenize=True)


# --- through the server ---

@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


def serve(model: Path, home: Path, log: Path) -> tuple[Any, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return start_server(["serve", "--model", str(model), "--port", str(port)], f"{url}/health", log,
                        env={"QWEN_MLX_HOME": str(home)}), url


@pytest.fixture(scope="module")
def served_model(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("tiny-qwen", max_position_embeddings=1024)


def chat(url: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                          json={"model": "tiny-qwen", "messages": messages, "max_tokens": 10, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def test_after_a_server_restart_a_conversation_prefills_only_the_new_message(served_model: Path, home: Path,
                                                                            tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "You are a careful archivist. " * 20},
                {"role": "user", "content": "What is in the first box?"}]
    process, url = serve(served_model, home, tmp_path / "first.log")
    try:
        first = chat(url, messages)
    finally:
        stop_server(process)  # SIGTERM: a clean shutdown writes the caches and the replies' ids
    process, url = serve(served_model, home, tmp_path / "second.log")
    try:
        follow_up = [*messages, {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And the second?"}]
        second = chat(url, follow_up)
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        # All of the first turn came from the cache (its last reply token aside, never run through the model):
        # only the new message and the template's markers around it were computed.
        assert cached >= first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"] - 1
        health = httpx.get(f"{url}/health").json()["prefix_cache"]
        assert health["disk_hits"] == 1 and health["hits"] == 1
    finally:
        stop_server(process)


def test_health_reports_the_prefix_cache(served_model: Path, home: Path, tmp_path: Path) -> None:
    process, url = serve(served_model, tmp_path / "fresh-home", tmp_path / "serve.log")
    try:
        chat(url, [{"role": "user", "content": "hi"}])
        chat(url, [{"role": "user", "content": "hi"}])
        stats = httpx.get(f"{url}/health").json()["prefix_cache"]
        assert stats["hits"] == 1 and stats["misses"] == 1 and stats["ram_entries"] == 1 and stats["ram_bytes"] > 0
    finally:
        stop_server(process)


def test_regenerating_a_first_turn_that_wrapped_the_rotating_cache_starts_from_its_prompt(
    served_model: Path, tmp_path: Path
) -> None:
    prompt = [{"role": "user", "content": "tick tock " * 60}]  # past a 64-position window within the prompt
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(["serve", "--model", str(served_model), "--port", str(port), "--max-kv-size", "64"],
                           f"{url}/health", tmp_path / "serve.log", env={"QWEN_MLX_HOME": str(tmp_path / "home")})
    try:
        first, again = chat(url, prompt), chat(url, prompt)
        assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    finally:
        stop_server(process)


def test_serve_starts_from_a_poisoned_disk_tier_and_says_what_it_set_aside(tiny: Loaded, tmp_path: Path) -> None:
    model, _ = tiny
    whole = disk_tier(model, tmp_path / "whole")
    cache = PromptCache.new(model)
    cache.prefill(model, SYSTEM)
    whole.write(cache)
    home = tmp_path / "home"
    demo = demo_model_folder(home / "models")
    names = poison(home / "kv-cache" / fingerprint(demo, weight_files(demo)) / "full",
                   next(iter(whole.index)).read_bytes())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    process = start_server(["serve", "--demo", "--port", str(port)], f"{url}/health", log,
                           env={"QWEN_MLX_HOME": str(home)})
    try:
        response = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "qwen2-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert response.status_code == 200, response.text
    finally:
        stop_server(process)
    said = log.read_text()
    for name in names:
        assert said.count(f"set aside {name}.safetensors") == 1, said
