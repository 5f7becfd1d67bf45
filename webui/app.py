"""The chat page: Gradio layout and handlers over a ModelWorker. No MLX here: the worker's thread runs the model.

Each browser session holds its Conversation in a gr.State; a reply streams from a worker Job into the
conversation's last message, and the page is re-sent at most every UPDATE_INTERVAL seconds. Stop cancels the Job,
and so does the streaming generator's `finally` when Gradio closes it (an API client's cancel, a closed tab); the
worker ends the generation within one token.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import gradio as gr

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.request import MAX_TOKENS_LIMIT
from qwen_mlx.sample import SamplingParams
from qwen_mlx.webui.conversations import Conversation, ConversationStore, is_id, new_id
from qwen_mlx.worker import Job, ModelWorker

UPDATE_INTERVAL = 0.04  # seconds between page updates while a reply streams: Gradio re-sends the message each time
DEFAULT_MAX_TOKENS = 2048
FINISH_NOTES = {"length": "max tokens reached", "cancelled": "stopped"}
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]
CSS = """
#chatbot .reply-stats { font-size: 0.78em; opacity: 0.65; margin-top: 0.6em; }
#model-info { padding: 0 0.5em; }
#model-info .demo-warning { color: #b45309; font-weight: 600; }
#model-info .load-error { color: #b91c1c; font-weight: 600; }
"""


class LiveReply:
    """The assistant message that a Job's chunks write, at the end of a conversation."""

    def __init__(self, conversation: Conversation, job: Job, worker: ModelWorker):
        self.conversation = conversation
        self.job = job
        self.worker = worker
        self.message: dict[str, Any] = {"role": "assistant", "content": ""}
        conversation.messages.append(self.message)
        self.finished = False
        self.handler_exited = threading.Event()  # the generator that streams this reply is gone

    def pump(self, until: float) -> bool:
        """Take the chunks that arrive before `until` (time.monotonic) or the end; whether the text changed."""
        changed = self._show_waiting()
        while not self.finished:
            try:
                chunk = self.job.get(timeout=max(0.0, until - time.monotonic()))
            except Exception as e:  # the error that ended the generation: shown in place of the reply
                self.message.update(content=describe_error(e), error=True)
                self.finished = True
                return True
            if chunk is None:
                break
            if chunk.text:
                self.message["content"] += chunk.text
                changed = True
            if chunk.finish_reason is not None:
                stats = asdict(chunk.stats) if chunk.stats is not None else {}
                self.message["stats"] = {**stats, "finish_reason": chunk.finish_reason}
                self.finished = changed = True
        return changed

    def _show_waiting(self) -> bool:
        """While every row is busy the reply says so (not saved: a placeholder, gone once the reply starts)."""
        waiting = not self.job.started.is_set() and not self.job.done.is_set()
        note = (f"waiting for a free row: the model is writing {self.worker.active} replies at once"
                if waiting else None)
        if note == self.message.get("waiting"):
            return False
        if note is None:
            self.message.pop("waiting", None)
        else:
            self.message["waiting"] = note
        return True

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


def stats_line(stats: dict[str, Any]) -> str:
    """Prompt tokens (how many were computed, the rest came from the cache), reply tokens, speed, context."""
    parts = []
    if "prompt_tokens" in stats:
        parts += [
            f"prompt {stats['prompt_tokens']} tokens ({stats['prefilled_tokens']} prefilled)",
            f"reply {stats['generation_tokens']} tokens",
            f"first token {stats['time_to_first_token']:.2f} s",
            f"{stats['generation_tps']:.1f} tokens/s",
            # "context_size": conversations saved before the field was named context_length
            f"context {stats['context_tokens']} / {stats.get('context_length', stats.get('context_size'))}",
        ]
        if stats.get("draft_tokens"):
            accepted, drafted = stats["accepted_draft_tokens"], stats["draft_tokens"]
            parts.append(f"drafts accepted {accepted}/{drafted} ({100 * accepted / drafted:.0f}%)")
    if stats.get("finish_reason") in FINISH_NOTES:
        parts.append(FINISH_NOTES[stats["finish_reason"]])
    return " · ".join(parts)


def chat_messages(conversation: Conversation) -> list[dict[str, str]]:
    """The Chatbot's value: one message per conversation message, replies with their statistics under them."""
    shown = []
    for m in conversation.messages:
        content = m["content"]
        if m.get("error"):
            content = f"⚠️ **Error:** {content}"
        elif m["role"] == "assistant":
            content = content or (f"⏳ {m['waiting']}" if m.get("waiting") else "…")
            if "stats" in m:
                content += f'\n\n<div class="reply-stats">{stats_line(m["stats"])}</div>'
        shown.append({"role": m["role"], "content": content})
    return shown


def prompt_messages(conversation: Conversation, system_prompt: str) -> list[dict[str, str]]:
    """What the model reads: the system prompt and the turns, without failed exchanges (error + its question)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for m in conversation.messages:
        if m.get("error"):
            if messages and messages[-1]["role"] == "user":
                messages.pop()
            continue
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def sampling_options(temperature: float, top_p: float, top_k: float, min_p: float, repetition_penalty: float,
                     max_tokens: float, seed: float | None) -> dict[str, Any]:
    """stream_generate's keyword arguments from the sliders; a negative (or no) seed means random."""
    return {
        "temperature": float(temperature),
        "top_p": float(top_p),
        "top_k": int(top_k),
        "min_p": float(min_p),
        "repetition_penalty": float(repetition_penalty),
        "max_tokens": int(max_tokens),
        "seed": None if seed is None or seed < 0 else int(seed),
    }


def default_system_prompt(worker: ModelWorker) -> str:
    """The system prompt the chat template writes when none is given (Qwen2.5: "You are Qwen, ...")."""
    if worker.tokenizer is None:
        return ""
    text = worker.tokenizer.apply_chat_template([{"role": "user", "content": "?"}], add_generation_prompt=False)
    match = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.DOTALL)
    return match.group(1) if match else ""


class ChatApp:
    """The handlers: they edit a session's Conversation, send Jobs to the worker and stream their chunks.

    Every handler returns the page: (conversation state, chat, message box, saved-conversation list).
    """

    def __init__(self, worker: ModelWorker, store: ConversationStore):
        self.worker = worker
        self.store = store
        self.replies: dict[str, LiveReply] = {}  # conversation id → its reply being generated or not yet settled

    def page(self, conversation: Conversation, message_box: str | None = None,
             listing: bool = True) -> tuple[Any, ...]:
        """The outputs for `conversation`; the message box (None: as it is) and the list only when asked."""
        if listing:
            saved = self.store.list(conversation.owner)
            listing_update = gr.Radio(
                choices=[(c.title, c.id) for c in saved],
                value=conversation.id if any(c.id == conversation.id for c in saved) else None,
            )
        return (
            conversation,
            chat_messages(conversation),
            gr.skip() if message_box is None else message_box,
            listing_update if listing else gr.skip(),
        )

    # The page and the saved conversations

    def restore(self, owner: str | None) -> tuple[Any, ...]:
        """On page load: this browser's most recent conversation (a browser is known by its stored owner id)."""
        owner = owner if is_id(owner) else new_id()
        saved = self.store.list(owner)
        return owner, *self.page(saved[0] if saved else Conversation(owner))

    def open(self, conversation_id: str, conversation: Conversation | None) -> tuple[Any, ...]:
        conversation = self.settle(conversation)
        opened = self.store.load(conversation.owner, conversation_id) if is_id(conversation_id) else None
        return self.page(opened or conversation)

    def new_chat(self, conversation: Conversation | None) -> tuple[Any, ...]:
        conversation = self.settle(conversation)
        return self.page(Conversation(conversation.owner), message_box="")

    def clear(self, conversation: Conversation | None) -> tuple[Any, ...]:
        """The chat's trash button: delete this conversation and start a new one."""
        conversation = self.settle(conversation)
        self.store.delete(conversation)
        self.worker.forget(conversation.id)
        return self.page(Conversation(conversation.owner), message_box="")

    # Generation

    def send(self, message: str, conversation: Conversation | None, system_prompt: str, temperature: float,
             top_p: float, top_k: float, min_p: float, repetition_penalty: float, max_tokens: float,
             seed: float = -1) -> Iterator[tuple[Any, ...]]:
        conversation = self.settle(conversation)
        if not message.strip():
            yield self.page(conversation, listing=False)
            return
        conversation.messages.append({"role": "user", "content": message})
        options = sampling_options(temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, seed)
        yield from self.stream_reply(conversation, system_prompt, options)

    def retry(self, data: gr.RetryData, conversation: Conversation | None, system_prompt: str,
              *sampling: Any) -> Iterator[tuple[Any, ...]]:
        conversation = self.settle(conversation)
        while conversation.messages and conversation.messages[-1]["role"] == "assistant":
            conversation.messages.pop()
        if not conversation.messages:
            yield self.page(conversation, listing=False)
            return
        yield from self.stream_reply(conversation, system_prompt, sampling_options(*sampling))

    def edit(self, data: gr.EditData, conversation: Conversation | None, system_prompt: str,
             *sampling: Any) -> Iterator[tuple[Any, ...]]:
        """A user message was edited: the conversation continues from it, with a new reply."""
        conversation = self.settle(conversation)
        index = data.index[0] if isinstance(data.index, list | tuple) else data.index
        if not 0 <= index < len(conversation.messages) or conversation.messages[index]["role"] != "user":
            yield self.page(conversation, listing=False)
            return
        del conversation.messages[index:]
        conversation.messages.append({"role": "user", "content": str(data.value)})
        yield from self.stream_reply(conversation, system_prompt, sampling_options(*sampling))

    def undo(self, conversation: Conversation | None) -> tuple[Any, ...]:
        """Take back the last question (and its reply), putting its text back in the message box."""
        conversation = self.settle(conversation)
        users = [i for i, m in enumerate(conversation.messages) if m["role"] == "user"]
        if not users:
            return self.page(conversation, listing=False)
        text = conversation.messages[users[-1]]["content"]
        del conversation.messages[users[-1] :]
        self.store.save(conversation)
        return self.page(conversation, message_box=text)

    def stop(self, conversation: Conversation | None) -> tuple[Any, ...]:
        return self.page(self.settle(conversation), listing=False)

    def stream_reply(self, conversation: Conversation, system_prompt: str,
                     options: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
        """Generate a reply to the conversation's last message, yielding the page as it grows."""
        self.settle_orphans()
        job = self.worker.submit(conversation.id, prompt_messages(conversation, system_prompt), **options)
        reply = self.replies[conversation.id] = LiveReply(conversation, job, self.worker)
        self.store.save(conversation)
        try:
            yield self.page(conversation, message_box="")
            while not reply.finished:
                if reply.pump(until=time.monotonic() + UPDATE_INTERVAL):
                    yield self.page(conversation, listing=False)
            if self.replies.get(conversation.id) is reply:
                del self.replies[conversation.id]
            self.store.save(conversation)
            yield self.page(conversation)
        finally:
            # Also runs when Gradio closes the generator (a cancelled event, a closed tab): the worker stops
            # within a token. Then this runs on the server's event loop, so it only raises the flag and saves;
            # `LiveReply.finish` takes the last chunks later.
            job.cancel()
            self.store.save(conversation)
            reply.handler_exited.set()

    def settle(self, conversation: Conversation | None) -> Conversation:
        """The session's conversation (a new one for a new API client), its reply in progress finished."""
        if conversation is None:
            return Conversation()
        reply = self.replies.pop(conversation.id, None)
        if reply is None:
            return conversation
        reply.finish(self.store)
        return reply.conversation  # after a page reload, `conversation` is a copy read from disk

    def settle_orphans(self) -> None:
        """Finish the replies whose page went away (a closed tab), so their statistics are saved too."""
        for conversation_id, reply in list(self.replies.items()):
            if reply.handler_exited.is_set() and reply.job.done.is_set():
                if self.replies.pop(conversation_id, None) is reply:
                    reply.finish(self.store)


def model_info(worker: ModelWorker, model_name: str, demo: bool) -> str:
    if worker.load_error is not None:
        return f'<span class="load-error">⚠️ {model_name} could not be loaded: {worker.load_error}</span>'
    info = f"**{model_name}** · context {worker.model.config.context_length} tokens"
    if demo:
        info += (
            ' · <span class="demo-warning">demo: a tiny model with random weights, so its replies are gibberish. '
            "For real replies run `qwen-mlx webui --model mlx-community/Qwen2.5-7B-Instruct-4bit`.</span>"
        )
    return info


def build_app(worker: ModelWorker, store: ConversationStore, *, model_name: str, demo: bool,
              browser_secret: str) -> gr.Blocks:
    """The chat page for a loaded (or failed) worker; `browser_secret` keeps the browsers' owner ids readable
    across server restarts."""
    app = ChatApp(worker, store)
    defaults = worker.model.sampling_defaults if worker.model is not None else SamplingParams()
    with gr.Blocks(title="qwen-mlx chat", fill_height=True) as page:
        owner = gr.BrowserState(None, storage_key="qwen-mlx-owner", secret=browser_secret)
        conversation = gr.State(None)  # set by the page load, or by the first request of an API client
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=200):
                new_chat = gr.Button("New chat", elem_id="new-chat", variant="secondary")
                conversations = gr.Radio([], label="Saved conversations", elem_id="conversations")
            with gr.Column(scale=4):
                gr.Markdown(model_info(worker, model_name, demo), elem_id="model-info")
                chatbot = gr.Chatbot(
                    elem_id="chatbot", height="68vh", editable="user", buttons=["copy", "copy_all"],
                    latex_delimiters=LATEX_DELIMITERS, feedback_options=None, show_label=False,
                    placeholder="Ask anything." if not demo else "Demo model: expect gibberish.",
                )
                with gr.Row():
                    message = gr.Textbox(
                        placeholder="Message (Enter sends, Shift+Enter for a new line)", show_label=False,
                        elem_id="message", lines=1, max_lines=12, scale=8, autofocus=True,
                    )
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1, min_width=80)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, min_width=80)
            with gr.Column(scale=1, min_width=240):
                system_prompt = gr.Textbox(default_system_prompt(worker), label="System prompt", lines=4,
                                           elem_id="system-prompt")
                with gr.Accordion("Sampling", open=True):
                    sampling = [
                        gr.Slider(0, 2, defaults.temperature, step=0.05, label="Temperature (0: greedy)",
                                  elem_id="temperature"),
                        gr.Slider(0.05, 1, defaults.top_p, step=0.05, label="Top p", elem_id="top-p"),
                        gr.Slider(0, 200, defaults.top_k, step=1, label="Top k (0: off)", elem_id="top-k"),
                        gr.Slider(0, 0.5, defaults.min_p, step=0.01, label="Min p", elem_id="min-p"),
                        gr.Slider(0.8, 2, defaults.repetition_penalty, step=0.01, label="Repetition penalty",
                                  elem_id="repetition-penalty"),
                        gr.Slider(1, MAX_TOKENS_LIMIT, DEFAULT_MAX_TOKENS, step=1, label="Max new tokens",
                                  elem_id="max-tokens"),
                        gr.Number(-1, precision=0, label="Seed (-1: random)", elem_id="seed"),
                    ]

        settings = [system_prompt, *sampling]
        page_outputs = [conversation, chatbot, message, conversations]
        # Every request goes to the worker, which decodes up to --max-batch replies together and queues the rest
        # (each then says it waits for a free row); Gradio's own queue holds only what exceeds that.
        model_queue = {"concurrency_limit": worker.max_batch + (worker.max_queue or 0), "concurrency_id": "model",
                       "show_progress": "minimal"}
        message.submit(app.send, [message, conversation, *settings], page_outputs, api_name="send", **model_queue)
        send.click(app.send, [message, conversation, *settings], page_outputs, api_visibility="private",
                   **model_queue)
        chatbot.retry(app.retry, [conversation, *settings], page_outputs, api_visibility="private", **model_queue)
        chatbot.edit(app.edit, [conversation, *settings], page_outputs, api_visibility="private", **model_queue)
        quick = {"queue": False, "show_progress": "hidden"}
        # Stop raises the reply's cancel flag and returns once the streaming handler has ended (within a token).
        # It does not use Gradio's `cancels=`: cancelling a running stream races its last updates in the browser,
        # which then shows "Error" over the chat. (A closed generator still raises the flag: see stream_reply.)
        stop.click(app.stop, [conversation], page_outputs, api_name="stop", **quick)
        chatbot.undo(app.undo, [conversation], page_outputs, api_visibility="private", **quick)
        chatbot.clear(app.clear, [conversation], page_outputs, api_visibility="private", **quick)
        new_chat.click(app.new_chat, [conversation], page_outputs, api_name="new_chat", **quick)
        conversations.input(app.open, [conversations, conversation], page_outputs, api_visibility="private",
                            **quick)
        page.load(app.restore, [owner], [owner, *page_outputs], api_visibility="private", **quick)
    return page
