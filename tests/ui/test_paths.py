"""Folders: the UI opens nothing outside the folders it was given, whatever the path says."""

from __future__ import annotations

import os

import pytest

from alpaca_lora.errors import ConfigError
from alpaca_lora.ui.paths import Folders


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    (root / "run").mkdir(parents=True)
    (root / "run" / "adapter_config.json").write_text("{}")
    (root / "data.json").write_text("[]")
    (tmp_path / "secret.txt").write_text("no")
    return root, tmp_path / "secret.txt"


def test_inside_paths_are_allowed(served):
    root, _ = served
    folders = Folders.from_paths([root])
    assert folders.check(root / "data.json") == (root / "data.json").resolve()
    assert folders.check(str(root / "run" / ".." / "data.json")) == (root / "data.json").resolve()
    assert folders.workspace == root.resolve()


@pytest.mark.parametrize("escape", ["../secret.txt", "run/../../secret.txt", "/etc/passwd", "~/.bashrc"])
def test_dotdot_and_absolute_escapes_are_refused(served, escape):
    root, _ = served
    folders = Folders.from_paths([root])
    target = escape if escape.startswith(("/", "~")) else str(root / escape)
    with pytest.raises(ConfigError, match="outside the folders this UI serves"):
        folders.check(target)


def test_symlink_escapes_are_refused(served):
    root, secret = served
    os.symlink(secret, root / "link.json")
    os.symlink(secret.parent, root / "linked-dir")
    folders = Folders.from_paths([root])
    for path in (root / "link.json", root / "linked-dir" / "secret.txt"):
        with pytest.raises(ConfigError, match="outside"):
            folders.check(path)
    assert root / "link.json" not in folders.data_files()  # listed files are checked the same way


def test_model_folders_are_readable_as_models_only(served, tmp_path):
    root, _ = served
    base = tmp_path / "base"
    base.mkdir()
    folders = Folders.from_paths([root]).with_models([base])
    assert folders.check(base, model=True) == base.resolve()
    with pytest.raises(ConfigError):
        folders.check(base)


def test_a_run_folder_given_makes_its_parent_the_workspace(served):
    root, _ = served
    folders = Folders.from_paths([root / "run"])
    assert folders.workspace == root.resolve()
    assert root.resolve() in folders.roots


def test_a_missing_folder_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="not a folder.*alpaca-lora ui"):
        Folders.from_paths([tmp_path / "nope"])


def test_empty_paths_are_refused(served):
    with pytest.raises(ConfigError, match="no path"):
        Folders.from_paths([served[0]]).check("  ")


def test_data_files_skip_run_folders(served):
    root, _ = served
    (root / "run" / "finetune_config.json").write_text("{}")
    (root / "run" / "train.json").write_text("[]")
    assert Folders.from_paths([root]).data_files() == [(root / "data.json").resolve()]
