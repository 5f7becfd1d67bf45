"""The chat page: Gradio layout, and which handler (chat.py) each control runs.

Where Gradio has the feature it is used as it is: the sidebar (behind a button on phones), the message box's own
send button that becomes Stop while a reply is written, the Chatbot's edit / retry / undo / copy, "Thinking"
blocks (message metadata), the browser's storage (gr.BrowserState) for the owner id, the conversation open and
the sampling settings. What Gradio 6.31 has no way to do lives in page.js: the line under each message
(statistics, ‹ k/n › alternatives, attachments), Esc and Enter in an edit, and the focus going back to the
message box.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gradio as gr

from qwen_mlx.engine.request import MAX_TOKENS_LIMIT
from qwen_mlx.model.generation_config import SamplingParams
from qwen_mlx.webui.chat import DEFAULT_MAX_TOKENS, ChatApp
from qwen_mlx.webui.context import DROP_OLDEST, POLICIES
from qwen_mlx.webui.conversations import ConversationStore
from qwen_mlx.webui.models import PageModels
from qwen_mlx.webui.rendering import LATEX_DELIMITERS

HERE = Path(__file__).parent
CSS = (HERE / "page.css").read_text(encoding="utf-8")
HEAD = f"<script>\n{(HERE / 'page.js').read_text(encoding='utf-8')}\n</script>"
REFRESH_SECONDS = 2.0  # how often a tab looks for conversations that other tabs saved, renamed or deleted
# gr.BrowserState encrypts in the browser, with a key it sends the page (it is in /config): that key hides nothing,
# so it is a fixed one (what browsers stored stays readable across restarts) and the server's secret is not it.
# What proves a browser's owner id is the server's signature on it (ChatApp.restore).
BROWSER_STORAGE_KEY = "qwen-mlx-browser-storage"
PRESETS = {
    "Model default": None,  # the chat template's own system prompt
    "Concise": "You are a helpful assistant. Answer briefly and directly; use lists only when they help.",
    "Programmer": "You are an expert programmer. Answer with correct, idiomatic code and explain it briefly. "
                  "Say when something is uncertain.",
    "Translator": "Translate the user's text. Into English if it is in another language, otherwise into the "
                  "language they ask for. Reply with the translation only.",
    "No system prompt": "",
}


def model_info(models: PageModels, model_name: str, demo: bool, load_error: Exception | None) -> str:
    if load_error is not None:
        return f'<span class="load-error">⚠️ {model_name} could not be loaded: {load_error}</span>'
    default = models.info(None)
    info = f"**{model_name}** · context {default.context_length if default else 0} tokens"
    if demo:
        info += (
            ' · <span class="demo-warning">demo: a tiny model with random weights, so its replies are gibberish. '
            "For real replies run `qwen-mlx webui --model mlx-community/Qwen2.5-7B-Instruct-4bit`.</span>"
        )
    return info


def recall(saved: Any) -> tuple[Any, ...]:
    """The settings this browser kept (its localStorage) across reloads, back in their controls."""
    names = ("policy", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed")
    if not isinstance(saved, dict):
        return tuple(gr.skip() for _ in names)
    return tuple(saved[n] if isinstance(saved.get(n), int | float | str) else gr.skip() for n in names)


@dataclass
class Controls:
    """The page's controls and per-browser state, as the handlers' inputs and outputs name them."""

    owner: Any
    open_id: Any
    saved_settings: Any
    conversation: Any
    deleted: Any
    attachments: Any
    shown: Any
    new_chat: Any
    search: Any
    conversations: Any
    title: Any
    export_md: Any
    export_json: Any
    import_json: Any
    delete: Any
    undo_delete: Any
    chatbot: Any
    status: Any
    attach: Any
    message: Any
    attachments_view: Any
    clear_attachments: Any
    meter: Any
    picker: Any
    preset: Any
    system_prompt: Any
    policy: Any
    sampling: list[Any]
    chat_meta: Any
    branch_action: Any
    api_send: Any
    timer: Any

    @property
    def outputs(self) -> list[Any]:
        """What every conversation handler returns (ChatApp.OUTPUTS), in that order."""
        return [self.conversation, self.chatbot, self.message, self.conversations, self.chat_meta, self.status,
                self.meter, self.open_id, self.system_prompt, self.title, self.attachments, self.attachments_view,
                self.picker]

    @property
    def settings(self) -> list[Any]:
        return [self.system_prompt, self.policy, *self.sampling]


def build_app(models: PageModels, store: ConversationStore, *, model_name: str, demo: bool, browser_secret: str,
              max_batch: int, max_queue: int | None) -> gr.Blocks:
    """The chat page over the models a conversation can pick (the default one loaded, or failed);
    `browser_secret` signs the owner ids browsers keep (kept on the server, so ids survive its restarts)."""
    app = ChatApp(models, store, owner_secret=browser_secret)
    try:
        default = models.load(None)
        load_error = None
    except Exception as e:  # the page says why, and a reply says it again
        default, load_error = None, e
    defaults = default.model.sampling_defaults if default is not None and default.model is not None \
        else SamplingParams()
    # Gradio copies every file a handler returns (the exports) into its cache: clear what is a day old, hourly.
    with gr.Blocks(title="qwen-mlx chat", fill_height=True, delete_cache=(3600, 86400)) as page:
        parts = {**browser_state(), **sidebar()}
        with gr.Row(equal_height=False, elem_id="page-row"):
            parts.update(main_column(model_info(models, model_name, demo, load_error), demo))
            parts.update(settings_column(models, app.default_system, defaults))
        parts.update(page_script_fields())
        controls = Controls(**{f.name: parts[f.name] for f in fields(Controls)})
        assert len(controls.outputs) == len(ChatApp.OUTPUTS)
        wire_replies(app, controls, max_batch, max_queue)
        wire_conversations(app, controls)
        wire_settings(app, controls, page)
    return page


def browser_state() -> dict[str, Any]:
    return {
        "owner": gr.BrowserState(None, storage_key="qwen-mlx-owner", secret=BROWSER_STORAGE_KEY),  # a signed token
        "open_id": gr.BrowserState(None, storage_key="qwen-mlx-open", secret=BROWSER_STORAGE_KEY),
        "saved_settings": gr.BrowserState(None, storage_key="qwen-mlx-settings", secret=BROWSER_STORAGE_KEY),
        "conversation": gr.State(None),  # set by the page load, or by the first request of an API client
        "deleted": gr.State(None),  # the conversation last deleted, for Undo
        "attachments": gr.State([]),  # files attached to the message being written: [{"name", "text"}]
        "shown": gr.State(None),  # the list as this tab last drew it (the timer redraws it only when it changed)
    }


def sidebar() -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Sidebar(open=False, elem_id="sidebar", width=300):
        c["new_chat"] = gr.Button("+ New chat", elem_id="new-chat", variant="primary", size="sm")
        c["search"] = gr.Textbox(placeholder="Search conversations", show_label=False, elem_id="search",
                                 container=False)
        c["conversations"] = gr.Radio([], label="Conversations", elem_id="conversations")
        with gr.Column(elem_id="this-conversation"):
            c["title"] = gr.Textbox(label="Title (Enter renames it)", elem_id="title", max_lines=1)
            with gr.Row():
                c["export_md"] = gr.DownloadButton("Export .md", elem_id="export-md", size="sm", interactive=False,
                                                   min_width=80)
                c["export_json"] = gr.DownloadButton("Export .json", elem_id="export-json", size="sm",
                                                     interactive=False, min_width=80)
            with gr.Row():
                c["import_json"] = gr.UploadButton("Import .json", file_types=[".json"], elem_id="import-json",
                                                   size="sm", min_width=80)
                c["delete"] = gr.Button("Delete", elem_id="delete", size="sm", variant="stop", min_width=80)
            c["undo_delete"] = gr.Button("Undo", elem_id="undo-delete", size="sm", visible=False)
    return c


def main_column(info: str, demo: bool) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Column(scale=4, elem_id="main"):
        gr.Markdown(info, elem_id="model-info")
        c["chatbot"] = gr.Chatbot(
            elem_id="chatbot", height="62vh", editable="user", buttons=["copy", "copy_all"],
            latex_delimiters=LATEX_DELIMITERS, feedback_options=None, show_label=False,
            group_consecutive_messages=False,
            placeholder="Ask anything." if not demo else "Demo model: expect gibberish.",
        )
        c["status"] = gr.HTML("", elem_id="status")
        with gr.Row(elem_id="composer", equal_height=True):
            c["attach"] = gr.UploadButton("Attach", file_count="multiple", elem_id="attach", size="sm", scale=0,
                                          min_width=70)
            c["message"] = gr.Textbox(
                placeholder="Message (Enter sends, Shift+Enter for a new line)", show_label=False,
                elem_id="message", lines=1, max_lines=12, scale=10, submit_btn=True, stop_btn=False,
                interactive=False,  # until the page load has restored the conversation (ChatApp.restore)
            )
        with gr.Row(elem_id="composer-extras"):
            c["attachments_view"] = gr.HTML("", elem_id="attachments")
            c["clear_attachments"] = gr.Button("Remove attachments", elem_id="clear-attachments", size="sm",
                                               scale=0, min_width=160)
        c["meter"] = gr.HTML("", elem_id="context-meter")
    return c


def settings_column(models: PageModels, default_system: str, defaults: SamplingParams) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Column(scale=1, min_width=260, elem_id="settings"):
        c["picker"] = gr.Dropdown(models.choices(), value=models.default, label="Model (this conversation's)",
                                  elem_id="model-picker")
        c["preset"] = gr.Dropdown(list(PRESETS), value=None, label="System prompt preset", elem_id="preset")
        c["system_prompt"] = gr.Textbox(default_system, label="System prompt (saved with the conversation; "
                                        "empty: none)", lines=4, elem_id="system-prompt")
        c["policy"] = gr.Radio(POLICIES, value=DROP_OLDEST, label="When the context is full",
                               elem_id="context-policy")
        with gr.Accordion("Sampling", open=True):
            c["sampling"] = [
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
    return c


def page_script_fields() -> dict[str, Any]:
    """What page.js reads and writes (the lines under the messages, the ‹ › clicks), the API's /send, the timer."""
    return {
        "chat_meta": gr.Textbox("[]", visible="hidden", elem_id="chat-meta"),
        "branch_action": gr.Textbox("", visible="hidden", elem_id="branch-action"),
        "api_send": gr.Button(visible=False),  # carries the one-call /send endpoint of API clients
        "timer": gr.Timer(REFRESH_SECONDS),
    }


QUICK: dict[str, Any] = {"queue": False, "show_progress": "hidden", "api_visibility": "private"}


def then_export(app: ChatApp, c: Controls, event: Any) -> Any:
    return event.then(app.exports, [c.conversation], [c.export_md, c.export_json], **QUICK)


def wire_replies(app: ChatApp, c: Controls, max_batch: int, max_queue: int | None) -> None:
    """Send, retry, edit, stop: what writes a reply."""
    # Every reply goes to the worker, which decodes up to --max-batch of them together and queues the rest
    # (each then says how many wait before it); Gradio's own queue holds only what exceeds that.
    model_queue = {"concurrency_limit": max_batch + (max_queue or 0), "concurrency_id": "model",
                   "show_progress": "hidden"}
    outputs = c.outputs

    def then_generate(event: Any) -> None:
        then_export(app, c, event.then(app.generate, [c.conversation, *c.settings], outputs,
                                       api_visibility="private", **model_queue))

    # The quick steps show the question (and an empty reply) at once; the reply streams in the next step.
    then_generate(c.message.submit(app.prepare_send, [c.message, c.attachments, c.conversation], outputs, **QUICK))
    then_generate(c.chatbot.retry(app.prepare_retry, [c.conversation], outputs, **QUICK))
    then_generate(c.chatbot.edit(app.prepare_edit, [c.conversation], outputs, **QUICK))
    c.api_send.click(app.api_send, [c.message, c.conversation, c.system_prompt, *c.sampling], outputs,
                     api_name="send", **model_queue)
    # Stop raises the reply's cancel flag and returns once the streaming handler has ended (within a token).
    # It does not use Gradio's `cancels=`: cancelling a running stream races its last updates in the browser,
    # which then shows "Error" over the chat. (A closed generator still raises the flag: see stream_reply.)
    c.message.stop(app.stop, [c.conversation], outputs, api_name="stop", queue=False, show_progress="hidden")
    then_export(app, c, c.chatbot.undo(app.undo, [c.conversation], outputs, **QUICK))


def wire_conversations(app: ChatApp, c: Controls) -> None:
    """The sidebar: new, open, search, rename, delete and undo, import; ‹ › between alternatives."""
    outputs = c.outputs
    # A new chat clears the search too, so that the list shows where it will appear.
    then_export(app, c, c.new_chat.click(app.new_chat, [c.conversation], [*outputs, c.search], api_name="new_chat",
                                         queue=False, show_progress="hidden"))
    then_export(app, c, c.conversations.input(app.open, [c.conversations, c.conversation, c.search], outputs,
                                              **QUICK))
    then_export(app, c, c.branch_action.change(app.switch_branch, [c.branch_action, c.conversation], outputs,
                                               **QUICK))
    undo = [*outputs, c.deleted, c.undo_delete]
    then_export(app, c, c.delete.click(app.delete, [c.conversation, c.search], undo, **QUICK))
    then_export(app, c, c.undo_delete.click(app.undo_delete, [c.deleted, c.conversation, c.search], undo, **QUICK))
    for trigger in (c.title.submit, c.title.blur):
        then_export(app, c, trigger(app.rename, [c.title, c.conversation, c.search], outputs, **QUICK))
    then_export(app, c, c.import_json.upload(app.import_json, [c.import_json, c.conversation, c.search], outputs,
                                             api_visibility="private", show_progress="hidden"))
    # .change, not .input: Gradio's "input" comes from key presses, and Backspace, Delete or a paste with the
    # mouse send none.
    c.search.change(app.search, [c.search, c.conversation], c.conversations, trigger_mode="always_last", **QUICK)
    c.timer.tick(app.refresh, [c.conversation, c.search, c.shown], [c.conversations, c.shown], **QUICK)


def wire_settings(app: ChatApp, c: Controls, page: gr.Blocks) -> None:
    """The settings column, attachments, the meter, and what a page load restores."""
    c.system_prompt.change(app.set_system_prompt, [c.system_prompt, c.conversation], c.meter, **QUICK)
    c.preset.input(lambda name, conversation: app.system_of_preset(PRESETS.get(name), conversation),
                   [c.preset, c.conversation], c.system_prompt, **QUICK)
    # Picking a model: downloaded (an alias not here yet) and loaded, its progress in the status line.
    c.picker.input(app.set_model, [c.picker, c.conversation], c.outputs, api_visibility="private",
                   show_progress="hidden")
    c.message.change(app.draft_meter, [c.message, c.attachments, c.conversation], c.meter,
                     trigger_mode="always_last", **QUICK)
    c.attach.upload(app.attach, [c.attach, c.attachments, c.message, c.conversation],
                    [c.attachments, c.attachments_view, c.meter, c.status], api_visibility="private",
                    show_progress="hidden")
    c.clear_attachments.click(app.clear_attachments, [c.message, c.conversation],
                              [c.attachments, c.attachments_view, c.meter], **QUICK)
    # Each change stores all the settings: through a queue of one, so that they are stored in the order made
    # (two quick changes answered out of order would store the older values last).
    for control in (c.policy, *c.sampling):
        control.change(app.remember, [c.conversation, c.policy, *c.sampling], [c.saved_settings, c.meter],
                       concurrency_limit=1, concurrency_id="settings", show_progress="hidden",
                       api_visibility="private")
    then_export(app, c, page.load(app.restore, [c.owner, c.open_id], [c.owner, *c.outputs], **QUICK))
    page.load(recall, [c.saved_settings], [c.policy, *c.sampling], **QUICK)
