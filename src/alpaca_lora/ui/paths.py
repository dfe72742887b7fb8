"""Path safety of the web UI: it reads and writes only inside the folders it was given.

Every path that comes from the browser (a model, a data file, a run folder) goes through
:meth:`Folders.check` before anything opens it: the path is resolved (symlinks followed, ``..``
collapsed) and must then lie inside one of the allowed roots. A symlink inside a root that points
outside it is refused like the outside path itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from alpaca_lora.errors import ConfigError, shown

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
"""Data files the Train tab offers."""
MAX_DEPTH = 4
"""How deep under a root the UI looks for runs, models and data files."""
SKIPPED_DIRS = {".git", "__pycache__", "node_modules", ".venv", "runs"}
"""Folders never searched (``runs`` holds TensorBoard event files, not runs)."""


@dataclass(frozen=True)
class Folders:
    """The folders the UI may read (``roots``) and where new runs go (``workspace``, one of the roots).

    Attributes:
        roots: Resolved folders; everything the UI opens lies inside one of them.
        workspace: The folder new training runs and merges are written to.
        extra_models: Model folders readable as models only (the embedded base, bases recorded in runs).

    """

    roots: tuple[Path, ...]
    workspace: Path
    extra_models: tuple[Path, ...] = ()

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path], workspace: str | Path | None = None) -> Folders:
        """The roots from the paths given on the command line (the current folder when none).

        A path that is itself a model or run folder makes its parent the workspace unless one is given;
        otherwise the first folder given is the workspace.

        Raises:
            ConfigError: A path that does not exist or is not a folder.

        """
        given = [Path(p).expanduser() for p in paths] or [Path.cwd()]
        bad = [str(p) for p in given if not p.is_dir()]
        if bad:
            raise ConfigError(f"not a folder: {', '.join(shown(b) for b in bad)}; give run folders, model folders "
                              "or folders that hold them (alpaca-lora ui alpaca-lora-demo)")
        roots = [p.resolve() for p in given]
        if workspace is None:
            first = roots[0]
            workspace_path = first.parent if _is_model_folder(first) else first
        else:
            workspace_path = Path(workspace).expanduser().resolve()
            workspace_path.mkdir(parents=True, exist_ok=True)
        if not any(_inside(workspace_path, r) for r in roots):
            roots.append(workspace_path)
        return cls(tuple(dict.fromkeys(roots)), workspace_path)

    def with_models(self, models: Iterable[Path]) -> Folders:
        """A copy that may also read the model folders ``models`` (as models only)."""
        extra = tuple(dict.fromkeys([*self.extra_models, *(Path(m).resolve() for m in models)]))
        return Folders(self.roots, self.workspace, extra)

    def check(self, path: str | Path, *, model: bool = False) -> Path:
        """``path`` resolved, when it lies inside a root (or is an allowed model folder when ``model``).

        Raises:
            ConfigError: The path lies outside every root, after following symlinks and ``..``.

        """
        text = str(path).strip()
        if not text:
            raise ConfigError("no path given; pick one from the list")
        resolved = Path(text).expanduser().resolve()
        if any(_inside(resolved, r) for r in self.roots):
            return resolved
        if model and any(resolved == m or _inside(resolved, m) for m in self.extra_models):
            return resolved
        raise ConfigError(f"{shown(text)} is outside the folders this UI serves ({', '.join(map(str, self.roots))}); "
                          "restart it with that folder on the command line: alpaca-lora ui FOLDER")

    def walk(self) -> Iterator[Path]:
        """Every folder under the roots (at most :data:`MAX_DEPTH` deep), the roots included, symlinks not followed."""
        seen: set[Path] = set()
        for root in self.roots:
            yield from _walk(root, 0, seen)

    def data_files(self) -> list[Path]:
        """Data files under the roots, outside model and run folders (which hold JSON of their own)."""
        found = []
        for folder in self.walk():
            if _is_model_folder(folder) or any(p.name.startswith("checkpoint-") for p in folder.parents):
                continue
            found.extend(p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in DATA_SUFFIXES
                         and not p.name.startswith(".") and p.name not in _RUN_JSON and self._allowed(p))
        return found

    def _allowed(self, path: Path) -> bool:
        try:
            self.check(path)
        except ConfigError:
            return False
        return True


_RUN_JSON = {"finetune_config.json", "train_results.json", "metrics.jsonl", "ui_config.json", "demo_report.json",
             "fingerprint.json", "merge_report.json"}


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def _walk(folder: Path, depth: int, seen: set[Path]) -> Iterator[Path]:
    if folder in seen:
        return
    seen.add(folder)
    yield folder
    if depth >= MAX_DEPTH:
        return
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return
    for child in children:
        if child.name not in SKIPPED_DIRS and not child.name.startswith("."):
            yield from _walk(child, depth + 1, seen)
