"""push_to_hub(): a real huggingface_hub client against a loopback Hub that records what arrives."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from alpaca_lora.export.hub import export_files
from fakes import TOKEN, FakeHub

EXPECTED = ["README.md", "config.json", "generation_config.json", "merge_report.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "prompt_template.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.server.shutdown()


@pytest.fixture
def export(tiny_model_dir, tmp_path):
    """A merged-export folder, plus the strays a user's folder collects."""
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_model_dir / name, folder / name)
    save_file({"a": torch.randn(8, 4)}, str(folder / "model-00001-of-00002.safetensors"), {"format": "pt"})
    save_file({"b": torch.randn(3)}, str(folder / "model-00002-of-00002.safetensors"), {"format": "pt"})
    index = {"metadata": {"total_size": 140}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "prompt_template.json").write_text('{"name": "alpaca"}')
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# tiny\n")
    (folder / "merge_report.json").write_text('{"verification": null}')
    # Strays that must never leave the machine.
    (folder / ".env").write_text("OPENAI_API_KEY=sk-stray-secret-from-dotenv\n")
    (folder / "checkpoint-3").mkdir()
    save_file({"x": torch.zeros(2)}, str(folder / "checkpoint-3" / "adapter_model.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (folder / "notes.txt").write_text("private notes")
    save_file({"y": torch.zeros(2)}, str(folder / "scratch.safetensors"))
    return folder


PUSH_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.DEBUG)  # everything any library logs goes to stderr
    from alpaca_lora.export.hub import push_to_hub
    try:
        print(json.dumps({"files": push_to_hub(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))}))
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc), "context": repr(exc.__context__)}))
""")


def _push(folder, repo_id, tmp_path, endpoint, env_token=None, **kwargs):
    """Run push_to_hub in a fresh interpreter, so HF_ENDPOINT and offline mode are read from this env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if env_token:
        env["HF_TOKEN"] = env_token
    run = subprocess.run([sys.executable, "-c", PUSH_SCRIPT, str(folder), repo_id, json.dumps(kwargs)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stdout + run.stderr


def _nothing_leaks(output, folder, result, tmp_path):
    """The token is in no output, log line, result, exception (with its context) or file written."""
    assert TOKEN not in output and TOKEN not in json.dumps(result)
    for path in [*folder.rglob("*"), *(tmp_path / "hf-home").rglob("*")]:
        assert path.is_dir() or TOKEN.encode() not in path.read_bytes(), path


def test_export_files_is_an_allow_list(export):
    assert export_files(export) == EXPECTED


@pytest.mark.parametrize("via", ["argument", "HF_TOKEN"])
def test_push_uploads_exactly_the_export_with_identical_bytes(export, hub, tmp_path, via):
    kwargs = {"token": TOKEN} if via == "argument" else {}
    result, output = _push(export, "me/tiny-merged", tmp_path, hub.url,
                           env_token=TOKEN if via == "HF_TOKEN" else None, **kwargs)
    assert result == {"files": EXPECTED}, output[-2000:]
    received = hub.files["me/tiny-merged"]
    assert sorted(received) == EXPECTED
    for name, data in received.items():
        assert data == (export / name).read_bytes(), name
    assert hub.repos["me/tiny-merged"]["visibility"] == "private"
    paths = " ".join(r["path"] for r in hub.requests)
    assert ".env" not in paths and "checkpoint" not in paths
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests if r["method"] == "POST")
    assert not [r for r in hub.requests if r["method"] == "GET"]  # no reads: create, validate, preupload, commit
    _nothing_leaks(output, export, result, tmp_path)


def test_public_repo_when_asked(export, hub, tmp_path):
    result, _ = _push(export, "me/public", tmp_path, hub.url, token=TOKEN, private=False)
    assert result["files"] == EXPECTED and hub.repos["me/public"]["visibility"] == "public"


def test_dry_run_needs_no_token_and_no_network(export, hub, tmp_path):
    result, output = _push(export, "me/tiny-merged", tmp_path, hub.url, dry_run=True)
    assert result == {"files": EXPECTED} and hub.requests == []


def test_missing_token_is_a_clear_error(export, hub, tmp_path):
    result, _ = _push(export, "me/tiny-merged", tmp_path, hub.url)
    assert result["error"] == "ConfigError" and "HF_TOKEN" in result["message"] and "token=" in result["message"]
    assert hub.requests == []


def test_hub_errors_never_echo_the_token(export, hub, tmp_path):
    result, output = _push(export, "me/forbidden", tmp_path, hub.url, token=TOKEN)
    assert result["error"] == "AlpacaLoraError" and "403" in result["message"] and "***" in result["message"]
    assert "me/forbidden" in result["message"] and result["context"] == "None"
    _nothing_leaks(output, export, result, tmp_path)


def test_bad_repo_id_and_empty_folder(tmp_path, hub):
    from alpaca_lora import ConfigError, ModelError
    from alpaca_lora.export.hub import push_to_hub

    with pytest.raises(ConfigError, match="repo_id"):
        push_to_hub(tmp_path, "a/b/c", dry_run=True)
    (tmp_path / "README.md").write_text("only a card")
    with pytest.raises(ModelError, match="no model weights"):
        push_to_hub(tmp_path, "me/x", dry_run=True)


# ---- symbolic links (issue #19): only regular files of the folder leave the machine -----------------


@pytest.fixture
def secret_outside(tmp_path):
    """A file outside the export that a link inside it points to (stands in for /etc/shadow)."""
    path = tmp_path / "outside" / "shadow"
    path.parent.mkdir()
    path.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    return path


@pytest.mark.parametrize(("name", "target"), [("model-00001-of-00002.safetensors", "absolute"),
                                              ("tokenizer.json", "relative"), ("README.md", "inside")])
def test_a_symlinked_file_is_refused_by_dry_run_and_upload(export, hub, tmp_path, secret_outside, name, target):
    import os

    from alpaca_lora import ModelError
    from alpaca_lora.export.hub import push_to_hub

    link = export / name
    link.unlink()
    if target == "absolute":
        link.symlink_to(secret_outside)
    elif target == "relative":
        link.symlink_to(os.path.relpath(secret_outside, export))
    else:  # even a link to a file of the folder itself: the rule is simple, and cp -L fixes it
        link.symlink_to("notes.txt")
    with pytest.raises(ModelError, match="symbolic link") as info:
        push_to_hub(export, "me/x", dry_run=True)
    assert name in str(info.value) and "cp --dereference" in str(info.value)
    with pytest.raises(ModelError, match="symbolic link"):
        export_files(export)
    result, output = _push(export, "me/tiny-merged", tmp_path, hub.url, token=TOKEN)
    assert result["error"] == "ModelError" and name in result["message"]
    assert hub.requests == []  # refused before anything was sent
    assert "secret-hash" not in output


def test_the_folder_itself_may_be_a_symlink(export, hub, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(export, target_is_directory=True)
    assert export_files(alias) == EXPECTED
    result, _ = _push(alias, "me/via-link", tmp_path, hub.url, token=TOKEN)
    assert result == {"files": EXPECTED} and sorted(hub.files["me/via-link"]) == EXPECTED


def test_a_file_swapped_for_a_link_after_listing_is_not_read(export, secret_outside):
    """The upload opens each listed file without following a link (O_NOFOLLOW), so a swap in between fails."""
    from alpaca_lora import ModelError
    from alpaca_lora.export.hub import _open_regular

    with _open_regular(export / "config.json") as fh:
        assert fh.read() == (export / "config.json").read_bytes()
    (export / "config.json").unlink()
    (export / "config.json").symlink_to(secret_outside)
    with pytest.raises(ModelError, match="symbolic link") as info:
        _open_regular(export / "config.json")
    assert "config.json" in str(info.value)
    with pytest.raises(ModelError, match="not a regular file"):
        _open_regular(export / "checkpoint-3")
