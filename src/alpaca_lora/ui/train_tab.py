"""The Train tab: pick data (inspected before training), a base and settings; start, watch, stop and resume.

Runs are separate processes (:mod:`alpaca_lora.ui.process`); what the tab shows while one trains (the
step, loss and eval curves, learning rate, tokens/s, ETA and the log) is read from the run folder once a
second (:mod:`alpaca_lora.ui.run_folder`), so a run started with ``alpaca-lora finetune`` in that folder
is watched the same way.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

from alpaca_lora.errors import ConfigError, shown
from alpaca_lora.ui import catalog, run_folder, train_form
from alpaca_lora.ui.paths import Folders
from alpaca_lora.ui.process import Trainer

REFRESH_S = 1.0
"""Seconds between two reads of the watched run folder."""
LOG_LINES = 60
"""Lines of the run's log shown."""
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def inspect(folders: Folders, data: str, base: str, cutoff_len: Any, template: str, train_on_inputs: bool) -> str:
    """The ``alpaca-lora inspect`` report of ``data`` for ``base`` (lengths, truncated, dropped, a masked example)."""
    from alpaca_lora.train.inspection import format_inspection, inspect_data

    try:
        path = folders.check(data)
        model = catalog.resolve_model(base, folders)
        report = inspect_data(path, model, cutoff_len=int(cutoff_len or 512), template=template or "alpaca",
                              train_on_inputs=bool(train_on_inputs))
    except Exception as exc:  # shown in the report box: the page stays usable
        return f"cannot inspect: {exc}"
    return format_inspection(report)


def run_folder_for(folders: Folders, name: str) -> Path:
    """The folder of a new run called ``name`` in the workspace.

    Raises:
        ConfigError: A name that is not a plain folder name.

    """
    name = (name or "").strip()
    if not _RUN_NAME.match(name):
        raise ConfigError(f"run name {shown(name)}: use letters, digits, '.', '_' and '-' (e.g. lora-run-1)")
    return folders.check(folders.workspace / name)


def start(folders: Folders, trainer: Trainer, data: str, base: str, name: str, *values: Any,
          resume: bool = False) -> tuple[str, Any]:
    """Start (or resume) a run; returns the message and the update of the watched-run drop-down."""
    import gradio as gr

    try:
        output_dir = run_folder_for(folders, name)
        if not resume and run_folder.checkpoints(output_dir):
            raise ConfigError(f"{output_dir.name} already holds checkpoints; press Resume to continue it, or pick "
                              "another run name")
        settings = train_form.settings(list(values))
        run = trainer.start(str(catalog.resolve_model(base, folders)), str(folders.check(data)), output_dir,
                            settings, resume=resume)
    except Exception as exc:  # a refused setting or path: say so, start nothing
        return f"⚠️ {exc}", gr.update()
    verb = "resumed" if resume else "started"
    choices = catalog.run_choices(folders)
    return f"{verb} `{run.output_dir.name}` ({run.status()})", gr.update(choices=choices, value=str(run.output_dir))


def resume(folders: Folders, trainer: Trainer, watched: str, data: str, base: str, *values: Any) -> tuple[str, Any]:
    """Resume the watched run from its newest checkpoint.

    A run this page started runs its own command again; any other uses the data, base and settings of the form.
    """
    import gradio as gr

    try:
        folder = folders.check(watched)
        if not run_folder.checkpoints(folder):
            raise ConfigError(f"{folder.name} has no checkpoint to resume from; press Start to train it")
        run = trainer.resume(folder)
    except Exception as exc:  # a refused path or a run still going: say so
        return f"⚠️ {exc}", gr.update()
    if run is None:
        return start(folders, trainer, data, base, folder.name, *values, resume=True)
    return f"resumed `{folder.name}` ({run.status()})", gr.update()


def stop(folders: Folders, trainer: Trainer, watched: str) -> str:
    """Send the watched run the graceful stop (SIGTERM): it saves a checkpoint and exits."""
    try:
        folder = folders.check(watched)
    except ConfigError as exc:
        return f"⚠️ {exc}"
    run = trainer.get(folder)
    if run is None:
        return ("this run was not started from this page: stop it where it runs (Ctrl-C, or kill -TERM its "
                "process), which saves a checkpoint the same way")
    if not run.stop():
        return f"`{folder.name}` is not running ({run.status()})"
    return f"stopping `{folder.name}`: saving a checkpoint…"


def watch(folders: Folders, trainer: Trainer, watched: str) -> tuple[str, Any, Any, str]:
    """Status line, loss and learning-rate plots and log tail of the watched run."""
    if not watched:
        return "no run selected", run_folder.frame([]), run_folder.frame([]), ""
    try:
        folder = folders.check(watched)
    except ConfigError as exc:
        return f"⚠️ {exc}", run_folder.frame([]), run_folder.frame([]), ""
    records = run_folder.read_metrics(folder)
    state = run_folder.progress(folder, records)
    run = trainer.get(folder)
    how = run.status() if run is not None else "started elsewhere (read from its folder)"
    saved = [p.name for p in run_folder.checkpoints(folder)]
    lines = [f"**{folder.name}**: {how}", state.line()]
    if saved:
        lines.append("checkpoints: " + ", ".join(saved))
    log = run_folder.read_tail(folder / run_folder.LOG_FILE, 2**18).splitlines()[-LOG_LINES:]
    curves = run_folder.frame(run_folder.curve_rows(records)), run_folder.frame(run_folder.lr_rows(records))
    return "  \n".join(lines), *curves, "\n".join(log)


def build(folders: Folders, trainer: Trainer, page: Any) -> None:
    """Lay out the Train tab inside the current ``gr.Tab`` of the Blocks ``page``."""
    import gradio as gr

    data_files = catalog.data_choices(folders)
    bases = catalog.base_choices(folders)
    with gr.Row():
        data = gr.Dropdown(data_files, value=data_files[0][1] if data_files else None, label="Data file",
                           allow_custom_value=True, elem_id="train-data", scale=3,
                           info=".json, .jsonl, .csv or .parquet inside the served folders")
        base = gr.Dropdown(bases, value=bases[0][1], label="Base model", elem_id="train-base", scale=3)
        name = gr.Textbox("lora-run-1", label="Run name", elem_id="train-name", scale=2,
                          info=f"the run folder, in {folders.workspace}")
    inspect_button = gr.Button("Inspect data", elem_id="train-inspect-button")
    report = gr.Code(label="Data inspection (alpaca-lora inspect)", language=None, elem_id="train-inspect",
                     lines=8)
    with gr.Accordion("Settings (FinetuneConfig)", open=True):
        values = []
        fields = list(train_form.FIELDS)
        for i in range(0, len(fields), 3):
            with gr.Row():
                values.extend(train_form.components_for(fields[i:i + 3]))
    with gr.Row():
        start_button = gr.Button("Start", variant="primary", elem_id="train-start")
        stop_button = gr.Button("Stop (save a checkpoint)", variant="stop", elem_id="train-stop")
        resume_button = gr.Button("Resume", elem_id="train-resume")
    message = gr.Markdown(elem_id="train-message")
    runs = catalog.run_choices(folders)
    watched = gr.Dropdown(runs, value=runs[0][1] if runs else None, label="Watching", elem_id="train-run",
                          info="a run of this page, or one started with alpaca-lora finetune in a served folder")
    status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="value", color="series", title="loss", elem_id="train-loss", height=260)
        lr_plot = gr.LinePlot(x="step", y="value", color="series", title="learning rate", elem_id="train-lr",
                              height=260)
    log = gr.Textbox(label="Log (train.log)", lines=12, max_lines=12, elem_id="train-log", autoscroll=True)

    named = {f: v for f, v in zip(train_form.FIELDS, values, strict=True)}
    inspect_button.click(partial(inspect, folders), [data, base, named["cutoff_len"], named["template"],
                                                     named["train_on_inputs"]], report)
    start_button.click(partial(start, folders, trainer), [data, base, name, *values], [message, watched])
    resume_button.click(partial(resume, folders, trainer), [watched, data, base, *values], [message, watched])
    stop_button.click(partial(stop, folders, trainer), watched, message)
    outputs = [status, loss_plot, lr_plot, log]
    watched.change(partial(watch, folders, trainer), watched, outputs)
    page.load(partial(watch, folders, trainer), watched, outputs)
    gr.Timer(REFRESH_S).tick(partial(watch, folders, trainer), watched, outputs, show_progress="hidden")
