"""A reply being written: the assistant message that a worker Job's chunks fill, with what the page shows while
it waits for a row or its prompt is read.

No MLX here: the worker's thread runs the model; this only reads the Job's chunks (see qwen_mlx.engine.worker).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from qwen_mlx.engine.worker import Job, ModelWorker
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.webui.conversations import Conversation, ConversationStore
from qwen_mlx.webui.rendering import THINK_OPEN

PROGRESS_FROM = 512  # prompt tokens to compute from which the reply shows how far their reading has come


class LiveReply:
    """The assistant message that a Job's chunks write (a node of the conversation's tree)."""

    def __init__(self, conversation: Conversation, message: dict[str, Any], job: Job, worker: ModelWorker,
                 prompt_tokens: int, dropped: int, opens_thinking: bool, ahead: Callable[[], int]):
        self.conversation = conversation
        self.message = message
        self.job = job
        self.worker = worker
        self.prompt_tokens = prompt_tokens  # for the context meter while the reply grows
        self.dropped = dropped  # the oldest messages its prompt leaves out
        self.opens_thinking = opens_thinking  # the chat template opened a <think> block for the model
        self.ahead = ahead  # () → how many replies wait for a row before this one
        self.origin = message.get("origin")  # what asked for it: "send", "edit" or "retry"
        message["unfinished"] = True  # saved with it until it ends: a server killed meanwhile leaves it there
        self.generated = 0
        self.finished = False
        self.emptied = False  # stopped before its first token: there is no reply
        self.accounted = False  # ChatApp.after_reply has run
        self.handler_exited = threading.Event()  # the generator that streams this reply is gone

    def pump(self, until: float) -> bool:
        """Take the chunks that arrive before `until` (time.monotonic) or the end; whether the page changed."""
        changed = self._show_progress()
        while not self.finished:
            try:
                chunk = self.job.get(timeout=max(0.0, until - time.monotonic()))
            except Exception as e:  # the error that ended the generation: shown in place of the reply
                self._settle_message()
                self.message.update(content=describe_error(e), error=True)
                self.finished = True
                return True
            if chunk is None:
                break
            if chunk.token is not None:
                self.generated += 1
            if chunk.text:
                if not self.message["content"] and self.opens_thinking:
                    self.message["content"] = THINK_OPEN + "\n"
                self.message["content"] += chunk.text
                changed = True
            if chunk.finish_reason is not None:
                self._finish(chunk)
                changed = True
        return changed

    def _finish(self, chunk: Any) -> None:
        self._settle_message()
        self.finished = True
        if chunk.finish_reason == "cancelled" and self.generated == 0 and not self.message["content"]:
            # Stopped while its prompt was read (or while it waited): there was no reply, so there is no message
            # and no statistics of a reply that never was (ChatApp.after_reply takes them out).
            self.emptied = True
            return
        stats = asdict(chunk.stats) if chunk.stats is not None else {}
        self.message["stats"] = {**stats, "finish_reason": chunk.finish_reason, "dropped": self.dropped}

    def _settle_message(self) -> None:
        for key in ("pending", "waiting", "prefill", "origin", "unfinished"):
            self.message.pop(key, None)

    def _show_progress(self) -> bool:
        """While it waits for a row, or its prompt is read, the empty reply says so (not saved)."""
        waiting = prefill = None
        if not self.finished and not self.job.done.is_set() and self.generated == 0:
            if not self.job.started.is_set():
                # The replies that must end before this one starts: those waiting before it, and one of those
                # being written (when every row is taken; else it starts right away).
                before = self.ahead()
                if before or self.worker.active >= self.worker.max_batch:
                    waiting = f"waiting for the model: {before + 1} ahead of you"
            elif self.job.prefill is not None and self.job.prefill[1] > PROGRESS_FROM:
                done, total = self.job.prefill
                prefill = [min(done, total), total]
        changed = False
        for key, value in (("waiting", waiting), ("prefill", prefill)):
            if self.message.get(key) != value:
                changed = True
                if value is None:
                    self.message.pop(key, None)
                else:
                    self.message[key] = value
        return changed

    def finish(self, store: ConversationStore) -> None:
        """Stop the reply once its handler is gone, take its last chunks and statistics, and save."""
        self.job.cancel()
        self.handler_exited.wait(timeout=10)
        self.pump(until=time.monotonic() + 10)  # at most one more token, then the last chunk
        store.save(self.conversation)


def describe_error(error: BaseException) -> str:
    if isinstance(error, QwenMLXError):
        return str(error)
    return f"internal error ({type(error).__name__}: {error}); the server log has the details"
