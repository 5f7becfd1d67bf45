"""The chat page's handlers: they edit a session's Conversation, send Jobs to the worker and stream their chunks.

No MLX here: the worker's thread runs the model. Each browser session holds its Conversation in a gr.State. An
action that generates runs in two steps: a quick one that shows the question and an empty reply at once (even
while the model is busy with others), then one that streams the reply from a worker Job into that message (a
reply.LiveReply), re-sending the page at most every UPDATE_INTERVAL seconds and saving it every SAVE_INTERVAL
seconds, so that a killed server keeps what was written. Stop cancels the Job, and so does the streaming
generator's `finally` when Gradio closes it (an API client's cancel, a closed tab); the worker ends the
generation within one token.
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.webui import branches
from qwen_mlx.webui.attachments import read_uploads, size_text
from qwen_mlx.webui.context import DROP_OLDEST, fit, meter_html, model_messages, prompt_ids, reply_room
from qwen_mlx.webui.conversations import (
    Conversation,
    ConversationStore,
    Summary,
    from_record,
    is_id,
    new_id,
    owner_token,
    token_owner,
)
from qwen_mlx.webui.export import write_exports
from qwen_mlx.webui.models import ModelInfo, PageModels
from qwen_mlx.webui.rendering import chat_view, meta_json
from qwen_mlx.webui.reply import LiveReply, describe_error

UPDATE_INTERVAL = 0.04  # seconds between page updates while a reply streams: Gradio re-sends the message each time
DEFAULT_MAX_TOKENS = 2048
SAVE_INTERVAL = 1.0  # seconds between saves of a reply being written (a killed server keeps the text so far)
NOTICE_SECONDS = 20.0  # how long a note (e.g. "stopped before the reply began") stays above the message box
MAX_IMPORT_BYTES = 20 * 1024 * 1024
SKIP = object()  # page(): leave this output as it is


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


def when(timestamp: float, now: float | None = None) -> str:
    """A conversation's date as the list shows it: the time today, the day this year, else the date."""
    moment, today = time.localtime(timestamp), time.localtime(now)
    if moment[:3] == today[:3]:
        return time.strftime("today %H:%M", moment)
    if moment.tm_year == today.tm_year:
        return time.strftime("%d %b %H:%M", moment)
    return time.strftime("%Y-%m-%d", moment)


def listing_choices(summaries: list[Summary], query: str = "") -> list[tuple[str, str]]:
    """The list's (label, id) pairs: title over date; a search keeps those whose title or text has every word."""
    words = query.lower().split()
    return [(f"{s.title}\n{when(s.updated)}", s.id) for s in summaries
            if all(w in s.title.lower() or w in s.text for w in words)]


class ChatApp:
    """The handlers. Each returns the page: `OUTPUTS` values, in order (see `page`)."""

    OUTPUTS = ("conversation", "chatbot", "message", "conversations", "chat_meta", "status", "meter", "open_id",
               "system_prompt", "title", "attachments", "attachments_view", "model")

    def __init__(self, models: PageModels, store: ConversationStore, export_root: Path | None = None, *,
                 owner_secret: str):
        self.models = models
        self.store = store
        self.owner_secret = owner_secret  # signs the owner tokens browsers keep (`restore`); never sent to a page
        self.export_root = export_root or Path(tempfile.gettempdir()) / "qwen-mlx-exports"
        self.replies: dict[str, LiveReply] = {}  # conversation id → its reply being generated or not yet settled
        # conversation id → (a note for its pages, until when): e.g. "stopped before the reply began"
        self.notices: dict[str, tuple[str, float]] = {}
        # conversation id → (text, attachments) of a message taken back, for its next page's message box
        self.returned: dict[str, tuple[str, list[dict[str, str]]]] = {}
        self._lock = threading.Lock()
        self._counts: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # conversation id → (key, prompt tokens)
        self.settings: dict[str, tuple[str, int]] = {}  # owner → (context policy, max tokens) of its page
        self.queries: dict[str, str] = {}  # owner → what its list is searched for (pages redrawn by a reply too)

    # The page

    def info(self, conversation: Conversation) -> ModelInfo | None:
        """The conversation's model as the page counts with it (None: not on this machine yet)."""
        return self.models.info(conversation.model)

    def model_system(self, model: str | None) -> str:
        """The system prompt `model`'s chat template writes when none is given (None: the default model's)."""
        info = self.models.info(model)
        return info.default_system if info is not None else ""

    @property
    def default_system(self) -> str:
        return self.model_system(None)

    def system_of(self, conversation: Conversation) -> str:
        if conversation.system_prompt is not None:
            return conversation.system_prompt
        return self.model_system(conversation.model)

    def page(self, conversation: Conversation, *, box: Any = SKIP, listing: bool = False, full: bool = False,
             streaming: bool = False, query: str = "", attachments: Any = SKIP, generating: bool | None = None,
             status: str | None = None) -> tuple[Any, ...]:
        """The outputs for `conversation`. `box`: the message box's new text; `generating`: whether it shows Stop
        (None: as it is); `listing`: the saved-conversation list too; `full`: everything that follows the
        conversation (its system prompt, title, the address bar's memory of it), as on opening it."""
        reply = self.replies.get(conversation.id)
        live = {id(reply.message)} if reply is not None and not reply.finished else set()
        if conversation.id in self.returned and not streaming:
            box, attachments = self.returned.pop(conversation.id)
        rows, meta = chat_view(conversation, live)
        if box is SKIP and generating is None:
            message = gr.skip()
        else:
            message = gr.Textbox(**({} if box is SKIP else {"value": box}),
                                 **({} if generating is None else {"submit_btn": not generating,
                                                                   "stop_btn": generating}))
        if listing or full:
            query = query or self.queries.get(conversation.owner, "")
            choices = listing_choices(self.store.list(conversation.owner), query)
            listing_update = gr.Radio(choices=choices,
                                      value=conversation.id if any(i == conversation.id for _, i in choices) else None)
        skip = gr.skip()
        # The title box holds the name the user gave (its placeholder, the title made from the first question), so
        # a reply that ends while they type a new name never overwrites what they typed.
        title_update = gr.Textbox(value=conversation.name, placeholder=conversation.title) if full else \
            gr.Textbox(placeholder=conversation.title) if listing else skip
        return (
            skip if streaming else conversation,
            rows,
            message,
            listing_update if listing or full else skip,
            json.dumps(meta_json(meta)),
            self.status_html(conversation) if status is None else status,
            self.meter(conversation, reply if live else None),
            conversation.id if full or listing else skip,
            self.system_of(conversation) if full else skip,
            title_update,
            skip if attachments is SKIP else attachments,
            skip if attachments is SKIP else self.attachments_html(attachments),
            gr.Dropdown(choices=self.models.choices(), value=self.models.name_of(conversation.model)) if full
            else skip,
        )

    def status_html(self, conversation: Conversation) -> str:
        """The line above the message box: what the model is doing for this conversation, and a note if any."""
        notice, until = self.notices.get(conversation.id, ("", 0.0))
        if notice and time.monotonic() > until:
            self.notices.pop(conversation.id, None)
            notice = ""
        note = f' <span class="notice">{html.escape(notice)}</span>' if notice else ""
        reply = self.replies.get(conversation.id)
        if reply is not None and not reply.finished:
            # The details (how many wait before it, how far the prompt's reading has come) are in the reply.
            if "waiting" in reply.message:
                return '<span class="busy waiting">● Waiting for the model · Esc or ■ cancels</span>' + note
            if reply.generated == 0:
                return '<span class="busy prefill">● Reading the prompt · Esc or ■ stops</span>' + note
            return (f'<span class="busy writing">● Writing the reply: {reply.generated} tokens · Esc or ■ '
                    "stops</span>") + note
        if conversation.messages and conversation.messages[-1].get("pending"):
            return '<span class="busy waiting">● Waiting for the model</span>' + note
        return note.strip()

    def next_prompt(self, conversation: Conversation, draft: dict[str, Any] | None = None) -> tuple[int, int]:
        """(tokens, oldest messages left out) of the prompt that sending `draft` (the message being written, with
        its attachments) would send, under this browser's policy for a full context."""
        info = self.info(conversation)
        if info is None:
            return 0, 0
        tokenizer, context_length = info.tokenizer, info.context_length
        system = self.system_of(conversation)
        messages = [m for m in conversation.messages if not (m.get("pending") and not m["content"])]
        key = (info.name, system, tuple((id(m), len(m["content"])) for m in messages))
        cached = self._counts.get(conversation.id)
        if cached is not None and cached[0] == key:
            used = cached[1]
        else:
            used = len(prompt_ids(tokenizer, system, model_messages(messages)))
            with self._lock:
                self._counts[conversation.id] = (key, used)
                self._counts.move_to_end(conversation.id)
                while len(self._counts) > 256:  # the conversations open lately
                    self._counts.popitem(last=False)
        # Without a draft, what the next message (however short) would send: then the oldest turns can go.
        turns = model_messages([*messages, draft or {"role": "user", "content": ""}])
        used += len(tokenizer.encode(turns[-1]["content"])) + 5  # with the template's markers around it
        policy, max_tokens = self.settings.get(conversation.owner, (DROP_OLDEST, DEFAULT_MAX_TOKENS))
        if policy == DROP_OLDEST and used + reply_room(context_length, max_tokens) > context_length:
            fitted = fit(tokenizer, system, turns, context_length, max_tokens, policy)
            if fitted.error is None:
                return len(fitted.ids), fitted.dropped
        return used, 0

    def meter(self, conversation: Conversation, reply: LiveReply | None = None, draft: str = "",
              attachments: list[dict[str, str]] | None = None) -> str:
        """The context meter: what the reply being written fills, or what the next message would."""
        info = self.info(conversation)
        if info is None or not info.context_length:
            return ""
        if reply is not None:
            used, dropped = reply.prompt_tokens + reply.generated, reply.dropped
        else:
            pending = {"role": "user", "content": draft, "attachments": attachments or []} \
                if draft.strip() or attachments else None
            used, dropped = self.next_prompt(conversation, pending)
        if dropped:
            note = f"the {dropped} oldest messages are left out of the prompt"
        elif used >= info.context_length:
            note = "the conversation no longer fits: see “When the context is full”"
        elif used >= 0.9 * info.context_length:
            note = "nearly full: see “When the context is full”"
        else:
            note = ""
        return meter_html(used, info.context_length, note)

    def remember(self, conversation: Conversation | None, policy: str, *sampling: Any) -> tuple[Any, Any]:
        """Keep the settings in this browser's storage (and here, for the meter); the meter they give."""
        names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed")
        saved = {"policy": policy, **dict(zip(names, sampling, strict=True))}
        if conversation is None:
            return saved, gr.skip()
        max_tokens = int(saved["max_tokens"]) if isinstance(saved["max_tokens"], int | float) else DEFAULT_MAX_TOKENS
        self.settings[conversation.owner] = (policy, max_tokens)
        return saved, self.meter(conversation)

    def attachments_html(self, attachments: list[dict[str, str]]) -> str:
        if not attachments:
            return ""
        chips = []
        info = self.models.info(None)  # the Qwen models share one tokenizer
        for a in attachments:
            tokens = len(info.tokenizer.encode(a["text"])) if info is not None else 0
            chips.append(f'<span class="chip">{html.escape(a["name"])} · {size_text(len(a["text"].encode()))} · '
                         f"{tokens} tokens</span>")
        return '<div class="attachment-chips">' + "".join(chips) + "</div>"

    def exports(self, conversation: Conversation | None) -> tuple[Any, Any]:
        """The two download buttons' files: this conversation as Markdown and as JSON."""
        if conversation is None or not conversation.messages:
            return gr.DownloadButton(value=None, interactive=False), gr.DownloadButton(value=None, interactive=False)
        folder = self.export_root / conversation.owner / conversation.id
        markdown, data = write_exports(conversation, self.system_of(conversation), folder)
        return gr.DownloadButton(value=str(markdown), interactive=True), gr.DownloadButton(value=str(data),
                                                                                           interactive=True)

    # The saved conversations

    def restore(self, token: str | None, open_id: str | None) -> tuple[Any, ...]:
        """On page load: the conversation this browser had open (a browser is known by the owner token it stored,
        which this server signed: any other token, a forged one included, is a new browser); the most recent one
        on a first visit. The browser stores the token returned."""
        owner = token_owner(token, self.owner_secret) or new_id()
        opened = self.store.load(owner, open_id) if is_id(open_id) else None
        if opened is None and open_id is None:
            saved = self.store.list(owner)
            opened = self.store.load(owner, saved[0].id) if saved else None
        if opened is None:
            opened = Conversation(owner, open_id if is_id(open_id) else new_id())
        page = list(self.page(opened, full=True, generating=False))
        # The message box is disabled until now: a question sent before the page knew its conversation would go to
        # a conversation of its own, then vanish when this answer replaced it.
        page[self.OUTPUTS.index("message")] = gr.Textbox(submit_btn=True, stop_btn=False, interactive=True)
        return owner_token(owner, self.owner_secret), *page

    def open(self, conversation_id: str, conversation: Conversation | None, query: str = "") -> tuple[Any, ...]:
        conversation = self.settle(conversation)
        opened = self.store.load(conversation.owner, conversation_id) if is_id(conversation_id) else None
        return self.page(opened or conversation, full=True, query=query, generating=False)

    def new_chat(self, conversation: Conversation | None) -> tuple[Any, ...]:
        """A new, empty conversation (saved once it has a message); the search is cleared. What is in the message
        box stays (to send in the new chat; and typing right after the click must not be wiped by its answer)."""
        conversation = self.settle(conversation)
        self.queries.pop(conversation.owner, None)
        page = self.page(Conversation(conversation.owner), full=True, generating=False)
        return *page, ""

    def delete(self, conversation: Conversation | None, query: str = "") -> tuple[Any, ...]:
        """Delete the open conversation (it is kept in the session, for Undo) and start a new one."""
        conversation = self.settle(conversation)
        self.store.delete(conversation)
        self.models.forget(conversation.id)
        shutil.rmtree(self.export_root / conversation.owner / conversation.id, ignore_errors=True)
        undo = gr.Button(f"Undo deleting “{conversation.title}”", visible=bool(conversation.messages))
        page = self.page(Conversation(conversation.owner), box="", full=True, query=query, generating=False)
        return *page, (conversation if conversation.messages else None), undo

    def undo_delete(self, deleted: Conversation | None, conversation: Conversation | None,
                    query: str = "") -> tuple[Any, ...]:
        conversation = self.settle(conversation)
        if deleted is None:
            return *self.page(conversation, listing=True, query=query), None, gr.Button(visible=False)
        deleted.owner = conversation.owner
        self.store.save(deleted)
        return *self.page(deleted, full=True, query=query, generating=False), None, gr.Button(visible=False)

    def rename(self, name: str, conversation: Conversation | None, query: str = "") -> tuple[Any, ...]:
        conversation = self.settle(conversation)
        name = " ".join(str(name or "").split())
        if name != conversation.name:
            conversation.name = name
            if conversation.messages:
                self.store.save(conversation)
        return self.page(conversation, full=True, query=query)

    def search(self, query: str, conversation: Conversation | None) -> Any:
        if conversation is None:
            return gr.skip()
        self.queries[conversation.owner] = query
        choices = listing_choices(self.store.list(conversation.owner), query)
        return gr.Radio(choices=choices, value=conversation.id if any(i == conversation.id for _, i in choices)
                        else None)

    def refresh(self, conversation: Conversation | None, query: str, shown: Any) -> tuple[Any, Any]:
        """The timer's check: the list again if it changed (another tab saved, renamed or deleted something)."""
        if conversation is None:
            return gr.skip(), gr.skip()
        choices = listing_choices(self.store.list(conversation.owner), query)
        if choices == shown:
            return gr.skip(), gr.skip()
        return gr.Radio(choices=choices, value=conversation.id if any(i == conversation.id for _, i in choices)
                        else None), choices

    def import_json(self, file: Any, conversation: Conversation | None, query: str = "") -> tuple[Any, ...]:
        """A conversation from a JSON file (an export of this page, or a list of {"role", "content"}), opened."""
        conversation = self.settle(conversation)
        path = Path(getattr(file, "name", file) or "")
        try:
            if path.stat().st_size > MAX_IMPORT_BYTES:
                raise ValueError(f"it is larger than {size_text(MAX_IMPORT_BYTES)}")
            tree, _, name, system_prompt, model = from_record(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            note = f"{path.name} could not be imported: {e}"
            gr.Warning(note)
            return self.page(conversation, status=f'<span class="notice error">⚠ {html.escape(note)}</span>')
        imported = Conversation(conversation.owner, new_id(), tree, time.time(), name, system_prompt, model)
        self.store.save(imported)
        self.notify(imported, f"Imported {path.name}.")
        return self.page(imported, full=True, query=query, generating=False)

    # Settings that belong to the conversation

    def system_of_preset(self, preset: str | None, conversation: Conversation | None) -> str:
        """A preset's system prompt; the model default's is the conversation's model's own."""
        if preset is not None:
            return preset
        return self.model_system(conversation.model if conversation is not None else None)

    def set_model(self, name: str, conversation: Conversation | None) -> Iterator[tuple[Any, ...]]:
        """The conversation talks to `name` from its next reply: downloaded first if it is an alias not on this
        machine, then loaded; the status line follows both. A failure leaves the conversation's model as it was."""
        conversation = self.own(conversation)
        if not isinstance(name, str) or not name or self.models.name_of(conversation.model) == name:
            yield self.page(conversation, full=True)
            return
        previous = conversation.model
        try:
            if not self.models.is_local(name):
                yield from self.downloading(conversation, name)
            yield self.page(conversation, status=f'<span class="busy loading">● Loading {html.escape(name)}…</span>')
            self.models.load(name)
        except QwenMLXError as e:
            conversation.model = previous
            note = f"{name} could not be used: {describe_error(e)}"
            gr.Warning(note)
            yield self.page(conversation, full=True, status=f'<span class="notice error">⚠ {html.escape(note)}</span>')
            return
        conversation.model = None if name == self.models.default else name
        if conversation.messages and conversation.id not in self.replies:
            self.store.save(conversation)
        self.notify(conversation, f"{name} is ready.")
        yield self.page(conversation, full=True)

    def downloading(self, conversation: Conversation, name: str) -> Iterator[tuple[Any, ...]]:
        """Download `name` on a thread of its own, the page showing how far it has come; errors are raised here."""
        done: list[tuple[int, int]] = [(0, 0)]
        failed: list[BaseException] = []

        def fetch() -> None:
            try:
                self.models.fetch(name, lambda got, total: done.append((got, total)))
            except BaseException as e:  # handed to the page's thread
                failed.append(e)

        thread = threading.Thread(target=fetch, name="qwen-mlx-download", daemon=True)
        thread.start()
        while thread.is_alive():
            got, total = done[-1]
            part = f" {got / total:.0%} of {size_text(total)}" if total else ""
            yield self.page(conversation, status=f'<span class="busy loading">● Downloading {html.escape(name)}'
                                                 f"{part}…</span>")
            thread.join(UPDATE_INTERVAL * 5)
        if failed:
            raise failed[0]

    def set_system_prompt(self, text: str, conversation: Conversation | None) -> Any:
        if conversation is None or text == self.system_of(conversation):
            return gr.skip()
        conversation.system_prompt = text
        if conversation.messages and conversation.id not in self.replies:
            self.store.save(conversation)
        return self.meter(conversation)

    def draft_meter(self, text: str, attachments: list[dict[str, str]] | None,
                    conversation: Conversation | None) -> Any:
        if conversation is None:
            return gr.skip()
        reply = self.replies.get(conversation.id)
        if reply is not None and not reply.finished:
            return gr.skip()
        return self.meter(conversation, draft=text or "", attachments=attachments)

    def attach(self, files: list[Any] | None, attachments: list[dict[str, str]] | None, text: str,
               conversation: Conversation | None) -> tuple[Any, ...]:
        attachments = list(attachments or [])
        attached, refused = read_uploads(files, len(attachments))
        attachments += [a.as_dict() for a in attached]
        for reason in refused:
            gr.Warning(reason)
        status = ('<span class="notice error">⚠ ' + html.escape("; ".join(refused)) + "</span>") if refused else ""
        meter = self.meter(conversation, draft=text or "", attachments=attachments) if conversation else gr.skip()
        return attachments, self.attachments_html(attachments), meter, status

    def clear_attachments(self, text: str, conversation: Conversation | None) -> tuple[Any, ...]:
        meter = self.meter(conversation, draft=text or "") if conversation else gr.skip()
        return [], "", meter

    # Changing the conversation shown

    def switch_branch(self, action: str, conversation: Conversation | None) -> tuple[Any, ...]:
        """‹ / › under a message: show its previous or next alternative (sent by page.js as "row:step:nonce")."""
        if conversation is None:
            return tuple(gr.skip() for _ in self.OUTPUTS)
        conversation = self.own(conversation)
        try:
            row, step = (int(part) for part in str(action).split(":")[:2])
        except ValueError:
            return self.page(conversation)
        if conversation.id in self.replies or (conversation.messages and conversation.messages[-1].get("pending")):
            return self.page(conversation, status='<span class="notice">The reply is still being written: stop it '
                                                  "first to look at the alternatives.</span>")
        _, meta = chat_view(conversation)
        if 0 <= row < len(meta) and branches.switch(conversation.tree, meta[row].at, 1 if step > 0 else -1):
            self.store.save(conversation)
        return self.page(conversation)

    def undo(self, conversation: Conversation | None) -> tuple[Any, ...]:
        """Take back the last question (and its reply), putting its text and files back in the message box."""
        conversation = self.settle(conversation)
        users = [i for i, m in enumerate(conversation.messages) if m["role"] == "user"]
        if not users:
            return self.page(conversation)
        question = conversation.messages[users[-1]]
        branches.remove(conversation.tree, users[-1])
        self.store.save(conversation)
        attachments = list(question.get("attachments", []))
        return self.page(conversation, box=question["content"], listing=True, attachments=attachments)

    def stop(self, conversation: Conversation | None) -> tuple[Any, ...]:
        return self.page(self.settle(conversation), generating=False)

    # Generation: the quick step (show the question and an empty reply), then `generate`

    def busy(self, conversation: Conversation) -> bool:
        return conversation.id in self.replies or bool(
            conversation.messages and conversation.messages[-1].get("pending"))

    def refuse_busy(self, conversation: Conversation) -> tuple[Any, ...]:
        self.notify(conversation, "A reply is still being written: stop it (Esc or ■) to send this one. Your "
                                  "message stays in the box.")
        return self.page(conversation)

    def prepare_send(self, message: str, attachments: list[dict[str, str]] | None,
                     conversation: Conversation | None) -> tuple[Any, ...]:
        conversation = self.own(conversation)
        if self.busy(conversation):
            return self.refuse_busy(conversation)
        self.notices.pop(conversation.id, None)
        attachments = list(attachments or [])
        if not (message or "").strip() and not attachments:
            return self.page(conversation)
        question = {"role": "user", "content": message or ""}
        if attachments:
            question["attachments"] = attachments
        branches.append(conversation.tree, question)
        branches.append(conversation.tree, {"role": "assistant", "content": "", "pending": True, "origin": "send"})
        self.store.save(conversation)
        return self.page(conversation, box="", listing=True, attachments=[], generating=True)

    def prepare_retry(self, data: gr.RetryData, conversation: Conversation | None) -> tuple[Any, ...]:
        """Regenerate the last reply as a new alternative (the old one stays, under ‹ ›)."""
        conversation = self.own(conversation)
        if self.busy(conversation):
            return self.refuse_busy(conversation)
        self.notices.pop(conversation.id, None)
        shown = conversation.messages
        if not any(m["role"] == "user" for m in shown):
            return self.page(conversation)
        reply = {"role": "assistant", "content": "", "pending": True, "origin": "retry"}
        if shown[-1]["role"] == "assistant":
            branches.add_alternative(conversation.tree, len(shown) - 1, reply)
        else:
            branches.append(conversation.tree, reply)
        return self.page(conversation, generating=True)

    def prepare_edit(self, data: gr.EditData, conversation: Conversation | None) -> tuple[Any, ...]:
        """An edited question becomes an alternative to it, answered anew (the old one stays, under ‹ ›)."""
        conversation = self.own(conversation)
        if self.busy(conversation):
            return self.refuse_busy(conversation)
        self.notices.pop(conversation.id, None)
        row = data.index[0] if isinstance(data.index, list | tuple) else data.index
        _, meta = chat_view(conversation)
        if not 0 <= row < len(meta) or meta[row].role != "user":
            return self.page(conversation)
        at = meta[row].at
        original = conversation.messages[at]
        edited = {"role": "user", "content": str(data.value)}
        if original.get("attachments"):
            edited["attachments"] = original["attachments"]
        branches.add_alternative(conversation.tree, at, edited)
        branches.append(conversation.tree, {"role": "assistant", "content": "", "pending": True, "origin": "edit"})
        self.store.save(conversation)
        return self.page(conversation, listing=True, generating=True)

    def generate(self, conversation: Conversation | None, system_prompt: str, policy: str, temperature: float,
                 top_p: float, top_k: float, min_p: float, repetition_penalty: float, max_tokens: float,
                 seed: float = -1) -> Iterator[tuple[Any, ...]]:
        """Write the reply the quick step left empty at the end of the conversation, yielding the page."""
        if conversation is None or not conversation.messages or not conversation.messages[-1].get("pending") \
                or conversation.id in self.replies:
            yield tuple(gr.skip() for _ in self.OUTPUTS)
            return
        options = sampling_options(temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, seed)
        yield from self.stream_reply(conversation, system_prompt, policy or DROP_OLDEST, options)

    def api_send(self, message: str, conversation: Conversation | None, system_prompt: str, temperature: float,
                 top_p: float, top_k: float, min_p: float, repetition_penalty: float, max_tokens: float,
                 seed: float = -1) -> Iterator[tuple[Any, ...]]:
        """`/send` for API clients: both steps in one call (their client reads one event's updates)."""
        page = self.prepare_send(message, [], conversation)
        conversation = page[self.OUTPUTS.index("conversation")]  # the one it asked in (maybe read again)
        if not conversation.messages or not conversation.messages[-1].get("pending") \
                or conversation.id in self.replies:
            yield page
            return
        yield from self.generate(conversation, system_prompt, DROP_OLDEST, temperature, top_p, top_k, min_p,
                                 repetition_penalty, max_tokens, seed)

    def stream_reply(self, conversation: Conversation, system_prompt: str, policy: str,
                     options: dict[str, Any]) -> Iterator[tuple[Any, ...]]:
        """Generate into the conversation's last message (an empty pending reply), yielding the page as it grows."""
        self.settle_orphans()
        message = conversation.messages[-1]
        conversation.system_prompt = system_prompt
        turns = model_messages(conversation.messages[:-1])
        info = self.info(conversation)
        if info is not None:
            fitted = fit(info.tokenizer, system_prompt, turns, info.context_length, options["max_tokens"], policy)
            if fitted.error is not None:
                message.pop("pending", None)
                message.update(content=fitted.error, error=True)
                self.store.save(conversation)
                yield self.page(conversation, listing=True, generating=False)
                return
            prompt, prompt_tokens, dropped = fitted.ids, len(fitted.ids), fitted.dropped
        else:  # the model is not on this machine: the registry says so
            prompt, prompt_tokens, dropped = turns, 0, 0
        try:
            job, worker = self.models.submit(conversation.model, conversation.id, prompt, **options)
        except QwenMLXError as e:  # the model failed to load, is not here, or its queue is full
            message.pop("pending", None)
            message.update(content=describe_error(e), error=True)
            self.store.save(conversation)
            yield self.page(conversation, listing=True, generating=False)
            return
        opens_thinking = info.opens_thinking if info is not None else False
        reply = LiveReply(conversation, message, job, worker, prompt_tokens, dropped, opens_thinking,
                          lambda: worker.position(job))
        with self._lock:
            self.replies[conversation.id] = reply
        try:
            yield self.page(conversation, generating=True)
            saved = time.monotonic()
            while not reply.finished:
                if reply.pump(until=time.monotonic() + UPDATE_INTERVAL):
                    yield self.page(conversation, streaming=True)
                if time.monotonic() - saved >= SAVE_INTERVAL and not reply.finished:
                    self.store.save(conversation)
                    saved = time.monotonic()
            if self.replies.get(conversation.id) is reply:
                del self.replies[conversation.id]
            self.after_reply(reply)
            self.store.save(conversation)
            yield self.page(conversation, listing=True, generating=False)
        finally:
            # Also runs when Gradio closes the generator (a cancelled event, a closed tab): the worker stops
            # within a token. Then this runs on the server's event loop, so it only raises the flag and saves;
            # `LiveReply.finish` takes the last chunks later.
            job.cancel()
            self.store.save(conversation)
            reply.handler_exited.set()

    def after_reply(self, reply: LiveReply) -> None:
        """Once a reply has ended: one stopped before its first token leaves no trace, and the message that asked
        for it (a question just sent or edited) goes back into the message box, to send again."""
        if reply.accounted:
            return
        reply.accounted = True
        if reply.emptied:
            back = self.take_back(reply.conversation, reply.message, reply.origin)
            prefill = reply.job.prefill
            if not reply.job.started.is_set():
                when_stopped = "Stopped while waiting for the model"
            else:
                read = f" ({prefill[0]} of {prefill[1]} tokens read)" if prefill else ""
                when_stopped = f"Stopped while reading the prompt{read}"
            self.notify(reply.conversation, f"{when_stopped}: nothing was written."
                        + (" Your message is back in the box." if back else ""))
        self.store.save(reply.conversation)

    def notify(self, conversation: Conversation, note: str) -> None:
        """A note above the message box, on this conversation's pages for a while (every page of the action that
        caused it shows it, whichever arrives last) or until the next question."""
        self.notices[conversation.id] = (note, time.monotonic() + NOTICE_SECONDS)

    def take_back(self, conversation: Conversation, reply: dict[str, Any], origin: str | None) -> bool:
        """Remove a reply that never began; if the message that asked for it was just sent or edited, remove
        that too and put it back in the message box (for the next page). Whether a message went back."""
        question = self.question_of(conversation.tree, reply) if origin in ("send", "edit") else None
        branches.detach(conversation.tree, question or reply)
        if question is not None:
            self.returned[conversation.id] = (question["content"], list(question.get("attachments", [])))
        return question is not None

    @staticmethod
    def question_of(tree: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any] | None:
        """The user message that `reply` answers (its parent in the tree), if it answers only with this reply."""
        stack = [tree]
        while stack:
            at = stack.pop()
            if any(child is reply for child in at["children"]):
                return at if at.get("role") == "user" and len(at["children"]) == 1 else None
            stack += at["children"]
        return None

    def own(self, conversation: Conversation | None) -> Conversation:
        """The session's conversation (a new one for a new API client), with its reply in progress left alone, or
        finished if the handler that streamed it is gone (a cancelled API call, a reloaded page)."""
        if conversation is None:
            return Conversation()
        reply = self.replies.get(conversation.id)
        if reply is None:
            return self.latest(conversation)
        if reply.handler_exited.is_set():
            return self.settle(conversation)
        return reply.conversation

    def latest(self, conversation: Conversation) -> Conversation:
        """The conversation as last saved, if another tab (or page) of this browser saved it since this one read it:
        an action on the older copy would save over what the other tab added."""
        shown = conversation.messages
        if shown and shown[-1].get("pending"):
            return conversation  # the quick step's question, not saved with its reply yet: this copy is the latest
        saved = self.store.load(conversation.owner, conversation.id)
        return saved if saved is not None and saved.updated > conversation.updated else conversation

    def settle(self, conversation: Conversation | None) -> Conversation:
        """The session's conversation (a new one for a new API client), its reply in progress finished."""
        if conversation is None:
            return Conversation()
        with self._lock:
            reply = self.replies.pop(conversation.id, None)
        if reply is None:
            shown = conversation.messages
            if shown and shown[-1].get("pending") and not shown[-1]["content"]:  # its reply never started
                self.take_back(conversation, shown[-1], shown[-1].get("origin"))
                return conversation
            return self.latest(conversation)
        reply.finish(self.store)
        self.after_reply(reply)
        return reply.conversation  # after a page reload, `conversation` is a copy read from disk

    def settle_orphans(self) -> None:
        """Finish the replies whose page went away (a closed tab), so their statistics are saved too."""
        for conversation_id, reply in list(self.replies.items()):
            if reply.handler_exited.is_set() and reply.job.done.is_set():
                with self._lock:
                    mine = self.replies.get(conversation_id) is reply
                    if mine:
                        del self.replies[conversation_id]
                if mine:
                    reply.finish(self.store)
                    self.after_reply(reply)
