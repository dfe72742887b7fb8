"""The Runs tab: every run and model folder under the served folders, with what it holds.

For the folder picked: its kind, progress and checkpoints, its loss curve, its config (fields that differ
from the defaults first), its reports (train results, evaluation, demo, merge) and its model card; and
buttons that merge an adapter into full-precision weights and export a model to GGUF, both written to
the workspace.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Any

from alpaca_lora.errors import ConfigError
from alpaca_lora.export import layout as art
from alpaca_lora.ui import catalog, run_folder, train_form
from alpaca_lora.ui.paths import Folders

logger = logging.getLogger(__name__)

GGUF_QUANTIZATION = "q8_0"
"""The GGUF type the Export button writes (llama.cpp's near-lossless 8-bit)."""


def choices(folders: Folders) -> list[tuple[str, str]]:
    """Every run, adapter, merged and model folder under the roots."""
    return [(e.label, str(e.path)) for e in catalog.entries(folders)]


def show(folders: Folders, value: str) -> tuple[str, Any, list[list[Any]], str, str]:
    """Summary, loss curve, config rows, reports (JSON) and model card of the folder ``value``."""
    if not value:
        return "no folder selected", run_folder.frame([]), [], "{}", ""
    try:
        folder = folders.check(value)
    except ConfigError as exc:
        return f"⚠️ {exc}", run_folder.frame([]), [], "{}", ""
    records = run_folder.read_metrics(folder)
    kind = run_folder.kind(folder) or "folder"
    lines = [f"**{folder.name}** ({kind}): `{folder}`"]
    if records:
        lines.append(run_folder.progress(folder, records).line())
    saved = [p.name for p in run_folder.checkpoints(folder)]
    lines.append("checkpoints: " + (", ".join(saved) if saved else "none"))
    base = run_folder.recorded_base(folder)
    if base:
        lines.append(f"base: `{base}`")
    config = run_folder.read_json(folder / art.CONFIG_FILE) or run_folder.read_json(folder / run_folder.UI_CONFIG)
    reports = json.dumps(run_folder.reports(folder), indent=2, default=str)
    curve = run_folder.frame(run_folder.curve_rows(records))
    return "  \n".join(lines), curve, train_form.config_rows(config), reports, run_folder.model_card(folder)


def merge_run(folders: Folders, value: str) -> tuple[str, Any]:
    """Merge the adapter ``value`` into ``<name>-merged`` in the workspace; the message and the new choices."""
    import gradio as gr

    from alpaca_lora.export.merge import merge

    try:
        folder = folders.check(value)
        if run_folder.kind(folder) != "adapter":
            raise ConfigError(f"{folder.name} is not an adapter folder (no {art.ADAPTER_CONFIG}): pick a run that "
                              "finished or was stopped with a saved adapter")
        out = folders.check(folders.workspace / f"{folder.name}-merged")
        merge(folder, out)
    except Exception as exc:  # shown on the page; the server keeps going
        logger.warning("merge: %s", exc)
        return f"⚠️ merge failed: {exc}", gr.update()
    return f"merged into `{out}`", gr.update(choices=choices(folders), value=str(out))


def export_run(folders: Folders, value: str) -> str:
    """Export the model ``value`` (merged, plain or adapter) to ``<name>-gguf/`` in the workspace as GGUF."""
    from alpaca_lora.export.gguf import export_gguf

    try:
        folder = folders.check(value)
        if run_folder.kind(folder) not in ("adapter", "merged", "model"):
            raise ConfigError(f"{folder.name} holds no model yet: export a merged folder, a model or an adapter")
        out_dir = folders.check(folders.workspace / f"{folder.name}-gguf")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = export_gguf(folder, out_dir / f"{folder.name}-{GGUF_QUANTIZATION}.gguf",
                           quantization=GGUF_QUANTIZATION, overwrite=True)
    except Exception as exc:  # shown on the page; the server keeps going
        logger.warning("export: %s", exc)
        return f"⚠️ export failed: {exc}"
    return f"exported `{path}`"


def build(folders: Folders, page: Any) -> None:
    """Lay out the Runs tab inside the current ``gr.Tab`` of the Blocks ``page``."""
    import gradio as gr

    listed = choices(folders)
    first = next((v for label, v in listed if label.endswith("(adapter)")), listed[0][1] if listed else None)
    with gr.Row():
        picked = gr.Dropdown(listed, value=first, label="Folder", elem_id="runs-folder", scale=5)
        refresh = gr.Button("↻ Refresh", elem_id="runs-refresh", scale=1)
    summary = gr.Markdown(elem_id="runs-summary")
    with gr.Row():
        merge_button = gr.Button("Merge adapter (full precision)", elem_id="runs-merge")
        export_button = gr.Button(f"Export GGUF ({GGUF_QUANTIZATION})", elem_id="runs-export")
    action = gr.Markdown(elem_id="runs-action")
    curve = gr.LinePlot(x="step", y="value", color="series", title="loss", elem_id="runs-loss", height=260)
    with gr.Row():
        config = gr.Dataframe(headers=["field", "value", "default"], label="Config (finetune_config.json)",
                              elem_id="runs-config", interactive=False, max_height=360)
        reports = gr.Code(label="Reports", language="json", elem_id="runs-reports", lines=14)
    with gr.Accordion("Model card (README.md)", open=False):
        card = gr.Markdown(elem_id="runs-card")

    outputs = [summary, curve, config, reports, card]
    picked.change(partial(show, folders), picked, outputs)
    page.load(partial(show, folders), picked, outputs)
    refresh.click(partial(_refresh, folders), picked, [picked, *outputs])
    merge_button.click(partial(merge_run, folders), picked, [action, picked])
    export_button.click(partial(export_run, folders), picked, action)


def _refresh(folders: Folders, value: str) -> tuple[Any, ...]:
    import gradio as gr

    listed = choices(folders)
    keep = value if value in {v for _, v in listed} else (listed[0][1] if listed else None)
    return (gr.update(choices=listed, value=keep), *show(folders, keep or ""))

