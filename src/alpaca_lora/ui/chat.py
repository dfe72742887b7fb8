"""The Chat tab: talk to a tuned model, alone or beside another (its base), with streamed replies.

A model whose tokenizer carries a chat template gets the whole conversation (multi-turn, rendered with
the folder's template, as :func:`alpaca_lora.generate` does for a list of messages); one without gets the
last message as an instruction in the folder's prompt template (single-turn, as it was trained). With a
second model picked, the same message goes to both and their replies stream side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from alpaca_lora.ui import catalog, run_folder
from alpaca_lora.ui.paths import Folders

logger = logging.getLogger(__name__)

NONE = ""
"""The compare drop-down's value for "no second model"."""


@dataclass(frozen=True)
class Settings:
    """Generation settings of the Chat tab (see :func:`alpaca_lora.generate`)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``generate``: sampling settings only when sampling (it refuses them otherwise)."""
        out: dict[str, Any] = {"max_new_tokens": int(self.max_new_tokens), "do_sample": bool(self.do_sample)}
        if self.do_sample:
            out.update(temperature=float(self.temperature), top_p=float(self.top_p))
        return out


def request(folder: Path, history: list[dict[str, str]], message: str) -> str | list[dict[str, str]]:
    """What ``generate`` is asked: the conversation for a model with a chat template, else the message alone."""
    if run_folder.has_chat_template(folder):
        return [*({"role": m["role"], "content": m["content"]} for m in history), {"role": "user", "content": message}]
    return message


def reply_stream(folder: Path, history: list[dict[str, str]], message: str, settings: Settings) -> Iterator[str]:
    """The growing reply of the model in ``folder`` (each item the whole text so far)."""
    from alpaca_lora.inference.generate import generate

    text = ""
    for piece in generate(folder, request(folder, history, message), stream=True, **settings.kwargs()):
        text += piece
        yield text


def _safe_stream(stream: Iterator[str] | None) -> Iterator[str]:
    """The stream, or one line naming the error that ended it (the page stays usable)."""
    if stream is None:
        return
    try:
        yield from stream
    except Exception as exc:  # any failure of a model is shown in its reply, never ends the server
        logger.warning("chat: %s", exc)
        yield f"⚠️ error: {exc}"


def respond(folders: Folders, message: str, model_a: str, model_b: str, history_a: list[dict[str, str]],
            history_b: list[dict[str, str]], settings: Settings
            ) -> Iterator[tuple[list[dict[str, str]], list[dict[str, str]]]]:
    """Send ``message`` to one model or two and yield both conversations as the replies grow.

    The two replies are read in turns, one piece from each, so they stream side by side.
    """
    message = (message or "").strip()
    if not message:
        return
    streams: list[Iterator[str] | None] = []
    convs: list[list[dict[str, str]]] = []
    for value, history in ((model_a, history_a), (model_b, history_b)):
        if not value:
            streams.append(None)
            convs.append(list(history))
            continue
        conv = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        try:
            folder = catalog.resolve_model(value, folders)
            streams.append(_safe_stream(reply_stream(folder, history, message, settings)))
        except Exception as exc:  # a refused or missing folder: say so in its reply
            streams.append(iter([f"⚠️ error: {exc}"]))
        convs.append(conv)
    yield convs[0], convs[1]
    live = [i for i, s in enumerate(streams) if s is not None]
    while live:
        for i in list(live):
            text = next(streams[i], None)  # type: ignore[call-overload]
            if text is None:
                live.remove(i)
            else:
                convs[i][-1] = {"role": "assistant", "content": text}
        yield convs[0], convs[1]


def mode_note(folders: Folders, value: str) -> str:
    """How the Chat tab talks to the model ``value``: multi-turn with its chat template, or single instructions."""
    if not value:
        return ""
    if value == catalog.EMBEDDED:
        return "chat template: multi-turn conversation"
    try:
        folder = catalog.resolve_model(value, folders)
    except Exception as exc:  # shown, not raised: the page stays usable
        return f"⚠️ {exc}"
    if run_folder.has_chat_template(folder):
        return f"`{folder.name}`: chat template, multi-turn conversation"
    return f"`{folder.name}`: no chat template, each message is one instruction in its prompt template"


def build(folders: Folders) -> None:
    """Lay out the Chat tab inside the current ``gr.Tab``."""
    import gradio as gr

    models = catalog.model_choices(folders)
    first = next((v for label, v in models if "(adapter)" in label or "(merged)" in label), models[0][1])
    with gr.Row():
        model_a = gr.Dropdown(models, value=first, label="Model", elem_id="chat-model", scale=3)
        model_b = gr.Dropdown([("none", NONE), *models], value=NONE, label="Side by side with", scale=3,
                              elem_id="chat-compare", info="the same message goes to both models")
        refresh = gr.Button("↻ Refresh list", scale=1, size="sm")
    note = gr.Markdown(mode_note(folders, first), elem_id="chat-mode")
    with gr.Row():
        chat_a = gr.Chatbot(label="Model", elem_id="chat-a", height=420)
        chat_b = gr.Chatbot(label="Side by side", elem_id="chat-b", height=420, visible=False)
    with gr.Row():
        message = gr.Textbox(placeholder="Ask something…", show_label=False, scale=6, elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=1)
    with gr.Accordion("Generation settings", open=False):
        max_new = gr.Slider(1, 1024, value=128, step=1, label="max_new_tokens", info="most tokens per reply")
        do_sample = gr.Checkbox(False, label="do_sample", info="sample instead of greedy decoding")
        temperature = gr.Slider(0.05, 2.0, value=0.7, label="temperature", info="only when sampling")
        top_p = gr.Slider(0.05, 1.0, value=0.9, label="top_p", info="only when sampling")

    inputs = [message, model_a, model_b, chat_a, chat_b, max_new, do_sample, temperature, top_p]
    send.click(partial(_on_send, folders), inputs, [message, chat_a, chat_b])
    message.submit(partial(_on_send, folders), inputs, [message, chat_a, chat_b])
    clear.click(lambda: ([], []), None, [chat_a, chat_b])
    model_a.change(lambda v: (mode_note(folders, v), []), model_a, [note, chat_a])
    model_b.change(lambda v: gr.update(visible=bool(v), value=[]), model_b, chat_b)
    refresh.click(partial(_on_refresh, folders), None, [model_a, model_b])


def _on_send(folders: Folders, text: str, a: str, b: str, hist_a: list[Any], hist_b: list[Any], n: float,
             sample: bool, t: float, p: float) -> Iterator[tuple[Any, Any, Any]]:
    settings = Settings(int(n), bool(sample), float(t), float(p))
    for conv_a, conv_b in respond(folders, text, a, b, _plain(hist_a), _plain(hist_b), settings):
        yield "", conv_a, conv_b


def _on_refresh(folders: Folders) -> tuple[Any, Any]:
    import gradio as gr

    choices = catalog.model_choices(folders)
    return gr.update(choices=choices), gr.update(choices=[("none", NONE), *choices])


def _plain(history: list[Any] | None) -> list[dict[str, str]]:
    """A chatbot's value as plain ``{role, content}`` messages (content as text)."""
    out = []
    for m in history or []:
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", "")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
        if role in ("user", "assistant", "system") and isinstance(content, str):
            out.append({"role": role, "content": content})
    return out
