"""Hostile model folders: custom code, symbolic links, seeded damage to a base folder; the base fingerprint.

Every hostile folder must load or raise our own error (``AlpacaLoraError``) naming the folder, quickly,
without ever running the folder's code or prompting on the terminal. ``_count`` tallies the inputs tried
by kind and is printed when the module ends (see it with ``-s``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alpaca_lora import AlpacaLoraError, ModelError, export_gguf, generate, load_model, merge
from alpaca_lora.export.fingerprint import base_fingerprint, fingerprints_match, weights_digest
from alpaca_lora.export.layout import FINGERPRINT_FILE, write_json
from alpaca_lora.model.folder_checks import CODE_FILES
from alpaca_lora.model.load import load_tokenizer
from conftest import SHORT_RECORDS, InputTally, save_tiny_llama, with_custom_code

TIME_LIMIT_S = 20.0  # per load; an honest load of the tiny base takes about half a second here
_count = InputTally("hostile model-folder inputs tried")
_outcome = InputTally("hostile model-folder outcomes")


@pytest.fixture(scope="module")
def same_shape_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A base of exactly the tiny base's shapes with other weights (another seed)."""
    return save_tiny_llama(tmp_path_factory.mktemp("same-shape"), smol_tokenizer, seed=7)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny base, with the fingerprint finetune records."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        model.save_pretrained(folder)
    write_json(folder / FINGERPRINT_FILE, {"base_model": base_fingerprint(tiny_model_dir)})
    return folder


def _loads_or_our_error(folder: Path, kind: str, *, quantization: str | None = None) -> str:
    """Load ``folder`` as a base: it loads, or raises our error naming it, within the time limit."""
    _count(kind)
    start = time.perf_counter()
    try:
        load_model(folder, quantization, "float32", device="cpu")
        outcome = "loaded"
    except AlpacaLoraError as exc:
        assert str(folder) in str(exc), f"{kind}: {str(exc)[:300]}"
        outcome = "refused"
    assert time.perf_counter() - start < TIME_LIMIT_S, f"{kind}: {time.perf_counter() - start:.1f} s"
    _outcome(outcome)
    return outcome


# ---- the base fingerprint: same shapes, other weights -----------------------------------------------


def test_fingerprint_tells_same_shape_bases_apart_and_accepts_a_copy(tiny_model_dir, same_shape_dir, tmp_path):
    ours, theirs = base_fingerprint(tiny_model_dir), base_fingerprint(same_shape_dir)
    assert ours["shapes_sha256"] == theirs["shapes_sha256"] and ours["architecture"] == theirs["architecture"]
    assert ours["weights_sha256"] != theirs["weights_sha256"]
    assert [d.split(":")[0] for d in fingerprints_match(ours, theirs)] == ["weights_sha256"]
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "copy")
    assert fingerprints_match(ours, base_fingerprint(copy)) == []
    older = {k: v for k, v in ours.items() if k != "weights_sha256"}  # an adapter written before the key existed
    assert fingerprints_match(older, theirs) == [] and fingerprints_match(theirs, older) == []


def test_weights_digest_samples_every_tensor_and_ignores_the_layout(tiny_model_dir, tmp_path):
    """Any change near either end of any tensor counts; the middle of a large tensor is never read."""
    from safetensors.torch import load_file, save_file

    from alpaca_lora.files import safetensors_header

    reference = weights_digest(tiny_model_dir)
    header, start = safetensors_header(tiny_model_dir / "model.safetensors")
    for name in ("model.norm.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        folder = shutil.copytree(tiny_model_dir, tmp_path / name)
        begin, end = header[name]["data_offsets"]
        for offset, changes in ((begin, True), (end - 4, True), ((begin + end) // 2, end - begin <= 8192)):
            data = bytearray((folder / "model.safetensors").read_bytes())
            data[start + offset] ^= 0x40
            (folder / "model.safetensors").write_bytes(bytes(data))
            assert (weights_digest(folder) != reference) is changes, (name, offset)
            data[start + offset] ^= 0x40
            (folder / "model.safetensors").write_bytes(bytes(data))
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    sharded = shutil.copytree(tiny_model_dir, tmp_path / "sharded", ignore=shutil.ignore_patterns("*.safetensors"))
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:7]}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[7:]}, str(sharded / "model-00002-of-00002.safetensors"))
    assert weights_digest(sharded) == reference


def test_an_adapter_is_refused_on_a_same_shape_base_with_other_weights(adapter_dir, tiny_model_dir, same_shape_dir,
                                                                      tmp_path):
    with pytest.raises(ModelError, match="weights_sha256") as info:
        generate(adapter_dir, "Say hi.", base_model=str(same_shape_dir), max_new_tokens=2)
    assert "not the model the adapter" in str(info.value)
    with pytest.raises(ModelError, match="weights_sha256"):
        merge(adapter_dir, tmp_path / "merged", base_model=same_shape_dir, verify=False)
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy-of-base")
    assert isinstance(generate(adapter_dir, "Say hi.", base_model=str(copy), max_new_tokens=2), str)
    older = shutil.copytree(adapter_dir, tmp_path / "older-adapter")
    recorded = json.loads((older / FINGERPRINT_FILE).read_text())
    del recorded["base_model"]["weights_sha256"]
    write_json(older / FINGERPRINT_FILE, recorded)
    assert isinstance(generate(older, "Say hi.", base_model=str(same_shape_dir), max_new_tokens=2), str)


# ---- custom code: never run, never prompted for ----------------------------------------------------

def _adapter_on(adapter: Path, base: Path, folder: Path) -> Path:
    """A copy of ``adapter`` whose adapter_config.json names ``base`` (and no fingerprint)."""
    shutil.copytree(adapter, folder)
    (folder / FINGERPRINT_FILE).unlink()
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return folder


@pytest.mark.parametrize("where", CODE_FILES)
def test_custom_code_in_any_config_file_is_refused_everywhere(tiny_model_dir, adapter_dir, tmp_path, where):
    marker = tmp_path / "RAN"
    folder = with_custom_code(tiny_model_dir, tmp_path / "custom", where, marker)
    adapter = _adapter_on(adapter_dir, folder, tmp_path / "adapter-on-custom")
    calls = {"load_tokenizer": lambda: load_tokenizer(folder),
             "load_model": lambda: load_model(folder, None, "float32", device="cpu"),
             "generate": lambda: generate(folder, "Say hi.", max_new_tokens=2),
             "generate adapter": lambda: generate(adapter, "Say hi.", max_new_tokens=2),
             "merge adapter": lambda: merge(adapter, tmp_path / "merged", verify=False),
             "export_gguf": lambda: export_gguf(folder, tmp_path / "m.gguf"),
             "export_gguf adapter": lambda: export_gguf(adapter, tmp_path / "a.gguf")}
    for name, call in calls.items():
        _count(f"custom code ({where})")
        with pytest.raises(ModelError, match="auto_map") as info:
            call()
        assert str(folder) in str(info.value) and where in str(info.value), name
    assert not marker.exists()


CUSTOM_CODE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from alpaca_lora import finetune, generate, load_model, merge
    from alpaca_lora.model.load import load_tokenizer
    custom, custom_tok, adapter, adapter_tok, base, out = map(Path, sys.argv[1:7])
    records = json.loads(sys.argv[7])
    calls = {
        "load_tokenizer": lambda: load_tokenizer(custom),
        "load_model": lambda: load_model(custom, None, "float32", device="cpu"),
        "load_tokenizer (tokenizer_config)": lambda: load_tokenizer(custom_tok),
        "finetune": lambda: finetune(custom, records, out / "run", max_steps=1, cutoff_len=64),
        "generate": lambda: generate(custom, "Say hi.", max_new_tokens=2),
        "generate adapter": lambda: generate(adapter, "Say hi.", max_new_tokens=2),
        "merge adapter": lambda: merge(adapter, out / "merged", verify=False),
        "merge adapter with custom tokenizer": lambda: merge(adapter_tok, out / "merged2", base_model=base),
    }
    for name, call in calls.items():
        try:
            call()
            print(json.dumps({"call": name, "error": None}), flush=True)
        except Exception as exc:
            print(json.dumps({"call": name, "error": type(exc).__name__, "message": str(exc)}), flush=True)
""")


def test_custom_code_never_runs_even_when_the_terminal_says_yes(tiny_model_dir, adapter_dir, tmp_path):
    """Every entry point on a custom-code folder, with 'y' waiting on stdin: refused, no prompt, code never ran.

    Before the fix transformers asked "Do you wish to run the custom code? [y/N]" and a 'y' ran evil.py.
    """
    marker = tmp_path / "RAN"
    custom = with_custom_code(tiny_model_dir, tmp_path / "custom", "config.json", marker)
    custom_tok = with_custom_code(tiny_model_dir, tmp_path / "custom-tok", "tokenizer_config.json", marker)
    adapter = _adapter_on(adapter_dir, custom, tmp_path / "adapter-on-custom")
    adapter_tok = shutil.copytree(adapter_dir, tmp_path / "adapter-with-custom-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "evil.py"):
        shutil.copyfile(custom_tok / name, adapter_tok / name)
    (tmp_path / "out").mkdir()
    args = [custom, custom_tok, adapter, adapter_tok, tiny_model_dir, tmp_path / "out", json.dumps(SHORT_RECORDS)]
    run = subprocess.run([sys.executable, "-c", CUSTOM_CODE_SCRIPT, *map(str, args)], input="y\n" * 50,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 8, run.stdout[-2000:] + run.stderr[-2000:]
    for result in results:
        _count("custom code (subprocess, stdin 'y')")
        assert result["error"] == "ModelError" and "auto_map" in result["message"], result
    assert "Do you wish to run the custom code" not in run.stdout + run.stderr
    assert not marker.exists()


# ---- symbolic links in a base folder ---------------------------------------------------------------


def _link_case(base: Path, tmp_path: Path, case: str) -> tuple[Path, str]:
    """Build one folder with a symbolic link; return it and the expected outcome ("loaded" or "refused")."""
    folder = shutil.copytree(base, tmp_path / "linked" / "base")
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret.txt"
    secret.write_text("root:$6$not-a-model:19000:0:99999:7:::\n")
    name, target = case.split(" -> ")
    file = folder / name
    if target == "outside copy":  # the Hub cache's layout: snapshot files link to blobs elsewhere
        shutil.move(file, outside / f"blob-{name}")
        file.symlink_to(outside / f"blob-{name}")
        return folder, "loaded"
    if target == "inside copy":
        (folder / "blobs").mkdir()
        shutil.move(file, folder / "blobs" / name)
        file.symlink_to(Path("blobs") / name)
        return folder, "loaded"
    file.unlink()
    if target == "outside secret":
        file.symlink_to(os.path.relpath(secret, folder))
    elif target == "/dev/zero":
        file.symlink_to("/dev/zero")
    elif target == "folder":
        file.symlink_to(outside, target_is_directory=True)
    elif target == "dangling":
        file.symlink_to(outside / "no-such-file")
    elif target == "itself":
        file.symlink_to(name)
    return folder, "loaded" if target == "dangling" and name not in ("config.json", "model.safetensors",
                                                                      "tokenizer.json") else "refused"


LINK_CASES = [f"{name} -> {target}" for name in ("model.safetensors", "config.json", "tokenizer.json")
              for target in ("outside copy", "inside copy", "outside secret", "/dev/zero", "folder", "dangling",
                             "itself")] + ["tokenizer_config.json -> /dev/zero", "generation_config.json -> dangling"]


@pytest.mark.parametrize("case", LINK_CASES)
def test_symlinks_in_a_base_folder(tiny_model_dir, tmp_path, case):
    if case.endswith("/dev/zero") and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    folder, expected = _link_case(tiny_model_dir, tmp_path, case)
    assert _loads_or_our_error(folder, f"symlink ({case.split(' -> ')[1]})") == expected


def test_a_base_folder_given_as_a_symlink_loads(tiny_model_dir, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(tiny_model_dir, target_is_directory=True)
    assert _loads_or_our_error(alias, "symlink (the folder itself)") == "loaded"


# ---- fuzzer: seeded damage to a base folder ---------------------------------------------------------


def _json_value(rng: random.Random, depth: int = 0):
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, 1, -1, 2, 3, 7, 64, 2**31, 2**63, 10**30, rng.randint(-10**6, 10**6)])
    if kind == "float":
        return rng.choice([0.0, 0.5, -1.0, 1e308, -1e-308, rng.uniform(-1e6, 1e6)])
    if kind == "str":
        return rng.choice(["", "llama", "float8", "flash_attention_2", "x" * 10_000, "\u0000", "evil.Evil",
                           "../../etc/passwd"])
    if kind == "list":
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["rope_type", "factor", "a", "", "model_type"]): _json_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _weights(folder: Path) -> tuple[Path, bytearray, int]:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    return path, data, length


def _truncate(rng, folder):
    path, data, _ = _weights(folder)
    path.write_bytes(bytes(data[: rng.randrange(len(data))]))


def _flip_header(rng, folder):
    path, data, length = _weights(folder)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(8, 8 + length)] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _header_length(rng, folder):
    path, data, length = _weights(folder)
    value = rng.choice([0, 1, 7, length - 1, length + 1, length + 8, len(data), 2**63, rng.getrandbits(64)])
    path.write_bytes(struct.pack("<Q", value) + bytes(data[8:]))


def _flip_data(rng, folder):
    path, data, length = _weights(folder)
    for _ in range(rng.randint(1, 16)):
        data[rng.randrange(8 + length, len(data))] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_tensor(rng, folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    del tensors[rng.choice(sorted(tensors))]
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})


def _delete_file(rng, folder):
    rng.choice(sorted(folder.iterdir())).unlink()


def _rename_file(rng, folder):
    files = sorted(folder.iterdir())
    a, b = rng.sample(files, 2)
    if rng.random() < 0.5:  # swap two names
        a.rename(folder / "swap.tmp")
        b.rename(a)
        (folder / "swap.tmp").rename(b)
    else:
        a.rename(folder / (a.name + rng.choice([".old", ".bin", "~", ".safetensors"])))


def _replace_config(rng, folder):
    value = _json_value(rng)
    (folder / "config.json").write_text(json.dumps(value) if rng.random() < 0.8 else json.dumps(value)[:5])


CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "head_dim", "model_type", "tie_word_embeddings", "rope_parameters", "hidden_act",
               "max_position_embeddings", "pad_token_id", "eos_token_id", "rms_norm_eps", "dtype", "architectures",
               "quantization_config", "auto_map", "attention_bias", "_attn_implementation"]


def _config_value(rng, folder):
    def edit(config):
        for _ in range(rng.randint(1, 3)):
            config[rng.choice(CONFIG_KEYS)] = _json_value(rng)
    _edit_json(folder / "config.json", edit)


def _config_key_removed(rng, folder):
    def edit(config):
        for key in rng.sample(sorted(config), rng.randint(1, 4)):
            del config[key]
    _edit_json(folder / "config.json", edit)


def _tokenizer_config_value(rng, folder):
    def edit(config):
        key = rng.choice(sorted(config) + ["pad_token", "eos_token", "added_tokens_decoder", "model_max_length"])
        config[key] = _json_value(rng)
    _edit_json(folder / "tokenizer_config.json", edit)


def _truncate_tokenizer(rng, folder):
    path = folder / "tokenizer.json"
    data = path.read_bytes()
    path.write_bytes(data[: rng.randrange(len(data))])


DAMAGE = {
    "weights truncated": _truncate, "weights header bytes flipped": _flip_header,
    "weights header length rewritten": _header_length, "weights data bytes flipped": _flip_data,
    "tensor dropped": _drop_tensor, "file deleted": _delete_file, "file renamed": _rename_file,
    "config.json replaced by random JSON": _replace_config, "config.json values randomised": _config_value,
    "config.json keys removed": _config_key_removed, "tokenizer_config.json value randomised": _tokenizer_config_value,
    "tokenizer.json truncated": _truncate_tokenizer,
}
INPUTS_PER_KIND = 25


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_fuzzed_base_folders_load_or_raise_our_error(tiny_model_dir, tmp_path, capfd, kind):
    outcomes = []
    for seed in range(INPUTS_PER_KIND):
        rng = random.Random(f"{kind}/{seed}")
        folder = shutil.copytree(tiny_model_dir, tmp_path / f"base-{seed}")
        DAMAGE[kind](rng, folder)
        quantization = "nf4" if seed % 4 == 3 else None  # a quarter through the real 4-bit load
        outcomes.append(_loads_or_our_error(folder, f"fuzz: {kind}", quantization=quantization))
        shutil.rmtree(folder)
    out, err = capfd.readouterr()
    assert "Do you wish to run the custom code" not in out + err
    if kind in ("weights truncated", "tensor dropped", "weights header length rewritten"):
        assert set(outcomes) == {"refused"}, outcomes  # damage of these kinds never yields a loadable model
    if kind == "weights data bytes flipped":
        assert set(outcomes) == {"loaded"}, outcomes  # the bytes are the tensors' own business: nothing to check


@pytest.mark.parametrize("config", [[{"hidden_size": 64}], {"hidden_size": "64"}, {"vocab_size": -1}, None])
def test_estimate_memory_on_a_damaged_config_names_the_file(tiny_model_dir, tmp_path, config):
    from alpaca_lora import estimate_memory

    _count("estimate_memory config")
    folder = shutil.copytree(tiny_model_dir, tmp_path / "base")
    full = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**full, **config} if isinstance(config, dict) else config))
    with pytest.raises(ModelError) as info:
        estimate_memory(folder)
    assert str(folder / "config.json") in str(info.value)
