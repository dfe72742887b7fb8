"""What the served folders hold: runs, models to chat with, bases to train on.

Choices are ``(label, value)`` pairs for the UI's drop-downs; a value is a resolved path, or
:data:`EMBEDDED` for the embedded SmolLM2-135M, which is converted (once, cached) only when used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alpaca_lora.ui import run_folder
from alpaca_lora.ui.paths import Folders

EMBEDDED = "embedded:SmolLM2-135M"
"""The value that stands for :func:`alpaca_lora.default_base_model` in a drop-down."""
EMBEDDED_LABEL = "base: SmolLM2-135M (embedded)"


@dataclass(frozen=True)
class Entry:
    """A folder the UI lists: its path, its kind (see :func:`run_folder.kind`) and a label relative to its root."""

    path: Path
    kind: str
    label: str


def entries(folders: Folders) -> list[Entry]:
    """Every run, adapter, merged and model folder under the roots (checkpoints left out)."""
    found = []
    for folder in folders.walk():
        if folder.name.startswith(run_folder.art.CHECKPOINT_PREFIX):
            continue
        kind = run_folder.kind(folder)
        if kind is not None:
            found.append(Entry(folder, kind, f"{_relative(folder, folders.roots)} ({kind})"))
    return found


def _relative(folder: Path, roots: tuple[Path, ...]) -> str:
    for root in roots:
        if folder.is_relative_to(root):
            rel = folder.relative_to(root)
            return str(Path(root.name) / rel) if str(rel) != "." else root.name
    return str(folder)


def recorded_bases(items: list[Entry]) -> list[Path]:
    """The local base folders the adapters and merged folders record (they may lie outside the roots)."""
    bases = []
    for entry in items:
        base = run_folder.recorded_base(entry.path) if entry.kind in ("adapter", "merged") else None
        if base and Path(base).is_dir() and (Path(base) / "config.json").is_file():
            bases.append(Path(base).resolve())
    return list(dict.fromkeys(bases))


def model_choices(folders: Folders, *, embedded: bool = True) -> list[tuple[str, str]]:
    """Models to chat with: adapters, merged and plain model folders, the bases they record, the embedded base."""
    items = entries(folders)
    choices = [(e.label, str(e.path)) for e in items if e.kind in ("adapter", "merged", "model")]
    listed = {value for _, value in choices}
    choices += [(f"base: {b.name} ({b})", str(b)) for b in recorded_bases(items) if str(b) not in listed]
    if embedded:
        choices.append((EMBEDDED_LABEL, EMBEDDED))
    return choices


def base_choices(folders: Folders) -> list[tuple[str, str]]:
    """Bases to train on: the plain and merged model folders, recorded bases and the embedded base."""
    items = entries(folders)
    choices = [(e.label, str(e.path)) for e in items if e.kind in ("merged", "model")]
    listed = {value for _, value in choices}
    choices += [(f"base: {b.name}", str(b)) for b in recorded_bases(items) if str(b) not in listed]
    return choices + [(EMBEDDED_LABEL, EMBEDDED)]


def run_choices(folders: Folders) -> list[tuple[str, str]]:
    """Run folders (adapters and runs still training or stopped), newest first."""
    runs = [e for e in entries(folders) if e.kind in ("adapter", "run")]
    runs.sort(key=lambda e: _mtime(e.path), reverse=True)
    return [(e.label, str(e.path)) for e in runs]


def _mtime(folder: Path) -> float:
    try:
        return max(p.stat().st_mtime for p in [folder, *folder.iterdir()])
    except OSError:
        return 0.0


def data_choices(folders: Folders) -> list[tuple[str, str]]:
    """Data files under the roots."""
    return [(_relative(p, folders.roots), str(p)) for p in folders.data_files()]


def resolve_model(value: str, folders: Folders) -> Path:
    """The model folder a drop-down value names, checked to lie inside the served folders.

    Raises:
        ConfigError: The value names a folder outside them.

    """
    if value == EMBEDDED:
        from alpaca_lora.model.embedded import default_base_model

        return default_base_model()
    allowed = folders.with_models(recorded_bases(entries(folders)))
    return allowed.check(value, model=True)
