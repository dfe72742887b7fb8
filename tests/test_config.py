"""FinetuneConfig: defaults, collected validation, unknown names, JSON/YAML round trips."""

from __future__ import annotations

import dataclasses

import pytest

from alpaca_lora.config import FinetuneConfig, check_field_names, field_names
from alpaca_lora.errors import ConfigError
from fakes import billion_laughs


def test_defaults_are_valid_and_match_alpaca_lora_names():
    cfg = FinetuneConfig()
    assert cfg.problems() == []
    assert cfg.gradient_accumulation_steps == cfg.batch_size // cfg.micro_batch_size == 8
    for name in ("batch_size", "micro_batch_size", "num_epochs", "learning_rate", "cutoff_len",
                 "val_set_size", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                 "train_on_inputs", "add_eos_token", "group_by_length", "resume_from_checkpoint"):
        assert name in field_names()


def test_every_field_has_a_docstring_in_the_source():
    import inspect

    source = inspect.getsource(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        line = next(ln for ln in source.splitlines() if ln.strip().startswith(f"{f.name}:"))
        after = source.split(line, 1)[1].lstrip()
        assert after.startswith('"""'), f"field {f.name} has no docstring"


def test_invalid_values_are_collected_in_one_error_naming_each_field():
    with pytest.raises(ConfigError) as info:
        FinetuneConfig(cutoff_len=0, lora_dropout=1.5, quantization="nf5", lr_scheduler="cosin",
                       learning_rate=-1)
    message = str(info.value)
    for needle in ("cutoff_len=0", "lora_dropout=1.5", "quantization='nf5'", "'nf4'", "lr_scheduler='cosin'",
                   "'cosine'", "learning_rate=-1"):
        assert needle in message
    assert message.count("\n  - ") == 5  # one line per problem
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_batch_size_must_be_a_multiple_of_micro_batch_size():
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size=4") as info:
        FinetuneConfig(batch_size=30, micro_batch_size=4)
    assert "use batch_size=28" in str(info.value)
    assert FinetuneConfig(batch_size=12, micro_batch_size=4).gradient_accumulation_steps == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("val_set_size", -1), ("val_set_size", 2.5), ("val_set_size", True), ("micro_batch_size", 2.0),
        ("max_steps", 0), ("lora_target_modules", []), ("lora_target_modules", ""), ("report_to", "mlflow"),
        ("compute_dtype", "fp8"), ("device", "tpu"), ("column_map", {"q": "question"}),
        ("save_total_limit", 0), ("warmup_ratio", 1.0), ("weight_decay", -0.1), ("lora_alpha", 0),
    ],
)
def test_single_invalid_value_names_its_field(field, value):
    with pytest.raises(ConfigError) as info:
        FinetuneConfig(**{field: value})
    assert f"{field}=" in str(info.value)


def test_valid_alternatives_are_accepted():
    cfg = FinetuneConfig(val_set_size=200, quantization=None, lora_target_modules=["q_proj", "v_proj"],
                         report_to=["tensorboard"], device="cuda:1", max_steps=10)
    assert cfg.val_set_size == 200 and cfg.quantization is None
    assert FinetuneConfig(val_set_size=0).val_set_size == 0


def test_unknown_field_in_from_dict_gives_close_matches_and_is_type_and_value_error():
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_dict({"learning_rat": 1e-4, "lora_r": 8}, source="my.yaml")
    message = str(info.value)
    assert "'learning_rat'" in message and "learning_rate" in message and "my.yaml" in message
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_unknown_field_in_replace_gives_close_matches_and_is_type_and_value_error():
    cfg = FinetuneConfig()
    with pytest.raises(TypeError) as info:
        cfg.replace(lora_rank=8, micro_batchsize=2)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ConfigError)
    assert "lora_rank" in message and "lora_r" in message
    assert "micro_batchsize" in message and "micro_batch_size" in message
    with pytest.raises(ConfigError, match="xyzzy"):
        check_field_names({"xyzzy": 1}, "test")


def test_replace_returns_a_validated_copy():
    cfg = FinetuneConfig()
    new = cfg.replace(lora_r=8, cutoff_len=256)
    assert (new.lora_r, new.cutoff_len) == (8, 256)
    assert (cfg.lora_r, cfg.cutoff_len) == (16, 512)  # the original is untouched
    with pytest.raises(ConfigError, match="lora_r=0"):
        cfg.replace(lora_r=0)


def _custom() -> FinetuneConfig:
    return FinetuneConfig(
        batch_size=16, micro_batch_size=2, learning_rate=1e-5, num_epochs=1.5, max_steps=7, lora_r=8,
        lora_target_modules=["q_proj", "v_proj"], quantization=None, val_set_size=0.1,
        template={"prompt_input": "{instruction}\n{input}\nA:", "prompt_no_input": "{instruction}\nA:",
                  "response_split": "A:"},
        column_map={"question": "instruction", "answer": "output"}, resume_from_checkpoint=True,
        report_to=["tensorboard", "wandb"],
    )


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_file_round_trip(tmp_path, suffix):
    cfg = _custom()
    path = cfg.save(tmp_path / f"cfg{suffix}")
    loaded = FinetuneConfig.from_file(path)
    assert loaded == cfg
    assert loaded.to_dict() == cfg.to_dict()
    assert isinstance(loaded.learning_rate, float) and loaded.learning_rate == 1e-5


def test_from_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        FinetuneConfig.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.json"):
        FinetuneConfig.from_file(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        FinetuneConfig.from_file(listy)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("lora_rr: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown.yaml"):
        FinetuneConfig.from_file(unknown)


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 1e-4\n", encoding="utf-8")
    assert FinetuneConfig.from_file(path).learning_rate == 1e-4


def test_report_to_none_is_a_config_error_or_means_none():
    try:
        cfg = FinetuneConfig(report_to=None)
    except ConfigError as exc:
        assert "report_to" in str(exc)
    else:
        assert cfg.report_to in (None, "none")


# ---- hardening (issue #19): every field checked, files bounded -----------------------------------


def test_the_constructor_itself_names_close_matches_for_an_unknown_keyword():
    with pytest.raises(ConfigError, match=r"'lora_rank' \(did you mean lora_r") as info:
        FinetuneConfig(lora_rank=8)
    assert isinstance(info.value, TypeError) and "FinetuneConfig()" in str(info.value)
    with pytest.raises(ConfigError, match="by position"):
        FinetuneConfig(*range(len(field_names()) + 1))
    assert FinetuneConfig(lora_r=8).lora_r == 8


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_epochs", float("nan")), ("num_epochs", float("inf")), ("num_epochs", "3"),
        ("val_set_size", float("nan")), ("val_set_size", float("inf")), ("val_set_size", "0.1"),
        ("seed", 1.5), ("seed", 42.0), ("seed", "42"), ("seed", -1), ("seed", 2**32), ("seed", True),
        ("template", 5), ("template", ["alpaca"]), ("template", None), ("template", {"prompt_input": "x"}),
        ("learning_rate", float("inf")), ("learning_rate", 10**400), ("weight_decay", float("inf")),
        ("max_grad_norm", float("nan")), ("warmup_ratio", float("nan")), ("lora_alpha", float("inf")),
        ("lora_alpha", 16.0), ("lora_dropout", float("nan")), ("lora_r", 10**9), ("lora_r", 8.0),
        ("cutoff_len", 2**31), ("ddp_timeout", 10**30), ("max_steps", 1e3), ("eval_steps", True),
        ("device", "cuda:x"), ("device", 0), ("resume_from_checkpoint", ""), ("resume_from_checkpoint", 1),
        ("column_map", {1: "instruction"}), ("column_map", {"a": "output", "b": "output"}),
        ("report_to", ["tensorboard", {}]), ("lr_scheduler", ["linear"]), ("quantization", {"nf4": 1}),
    ],
)
def test_non_finite_wrongly_typed_and_out_of_range_values_name_field_value_and_fix(field, value):
    with pytest.raises(ConfigError) as info:
        FinetuneConfig(**{field: value})
    message = str(info.value)
    assert f"{field}=" in message and ("must" in message or "missing fields" in message), message
    assert len(message) < 2000


@pytest.mark.parametrize("field", ["learning_rate", "num_epochs", "weight_decay", "max_grad_norm", "warmup_ratio",
                                   "lora_dropout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_field_must_be_finite(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value!r}: must be a finite number"):
        FinetuneConfig(**{field: value})


def test_messages_give_the_range_and_a_fix():
    with pytest.raises(ConfigError) as info:
        FinetuneConfig(lora_r=10**9, lora_alpha=16.0, seed="7", learning_rate=float("inf"))
    message = str(info.value)
    assert "lora_r=1000000000: must be an int in [1, 65536]; e.g. lora_r=16" in message
    assert "lora_alpha=16.0: must be an int" in message and "use lora_alpha=16" in message
    assert "seed='7'" in message and "write a number, not text: seed=7" in message
    assert "learning_rate=inf: must be a finite number > 0" in message


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(FinetuneConfig) if f.type == "bool"])
@pytest.mark.parametrize(("value", "meant"), [("no", False), ("False", False), ("yes", True), ("true", True),
                                              (0, False), (1, True)])
def test_bool_fields_refuse_text_and_numbers_and_say_which_bool(field, value, meant):
    with pytest.raises(ConfigError, match=f"must be True or False.*use {field}={meant}"):
        FinetuneConfig(**{field: value})


def test_train_on_inputs_no_is_not_true():
    with pytest.raises(ConfigError, match="train_on_inputs='no': must be True or False"):
        FinetuneConfig(train_on_inputs="no")
    assert FinetuneConfig(train_on_inputs=False).train_on_inputs is False


def test_numpy_numbers_and_paths_become_python_values(tmp_path):
    import numpy as np

    from alpaca_lora.data.prompts import get_template

    cfg = FinetuneConfig(lora_r=np.int64(8), learning_rate=np.float32(1e-3), resume_from_checkpoint=tmp_path,
                         template=get_template("alpaca_short"))
    assert type(cfg.lora_r) is int and type(cfg.learning_rate) is float
    assert cfg.resume_from_checkpoint == str(tmp_path) and cfg.template["name"] == "alpaca_short"


def test_yaml_inf_and_nan_are_refused_by_field(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: .inf\nweight_decay: .inf\nmax_grad_norm: .nan\nseed: 1.5\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_file(path)
    message = str(info.value)
    for needle in ("learning_rate=inf", "weight_decay=inf", "max_grad_norm=nan", "seed=1.5"):
        assert needle in message


def test_a_billion_laughs_yaml_is_refused_quickly_without_expanding_it(tmp_path):
    import time
    import tracemalloc

    path = billion_laughs(tmp_path / "bomb.yaml")
    assert path.stat().st_size < 2000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match="more than 10,000 values once its YAML aliases") as info:
            FinetuneConfig.from_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 20 * 2**20
    assert str(path) in str(info.value) and len(str(info.value)) < 500


def test_recursive_and_deep_yaml_and_json_are_refused(tmp_path):
    cases = {"cycle.yaml": "template: &a [1, *a]\n", "deep.yaml": "template: " + "[" * 70 + "]" * 70 + "\n",
             "deeper.yaml": "template: " + "[" * 50_000, "deep.json": '{"template": ' + "[" * 50_000,
             "long.yaml": "lora_target_modules: [" + ", ".join(["q"] * 20_000) + "]\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=name):
            FinetuneConfig.from_file(tmp_path / name)


@pytest.mark.parametrize(("name", "data", "needle"), [
    ("latin1.yaml", "lora_r: 8\nreport_to: 'café'\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 on line 2)"),
    ("utf16.yaml", "lora_r: 8\n".encode("utf-16"), "UTF-16"),
    ("utf16le.json", '{"lora_r": 8}'.encode("utf-16-le"), "NUL byte"),
    ("utf32.json", '{"lora_r": 8}'.encode("utf-32"), "UTF-32"),
    ("empty.yaml", b"", "is empty"),
    ("blank.json", b"  \n\t\n", "is empty"),
    ("list.yaml", b"- lora_r\n- 8\n", "must hold a mapping"),
    ("scalar.json", b"8", "must hold a mapping"),
    ("nan.json", b'{"learning_rate": NaN, "num_epochs": Infinity}', "learning_rate=nan"),
    ("intkey.yaml", b"1: 8\nnull: 2\n", "(a field name is text)"),
    ("bigint.json", b'{"seed": ' + b"9" * 5000 + b"}", "does not parse"),
    ("python.yaml", b"seed: !!python/object/apply:os.getpid []\n", "does not parse"),
    ("two.yaml", b"lora_r: 8\n---\nlora_r: 9\n", "does not parse"),
    ("huge.yaml", b"# " + b"x" * (2**20) + b"\n", "larger than 1,048,576 bytes"),
])
def test_config_files_that_are_not_configs_are_config_errors_naming_the_file(tmp_path, name, data, needle):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.from_file(path)
    message = str(info.value)
    assert needle in message and (str(path) in message or "=" in message), message
    assert len(message) < 2000


def test_a_folder_or_an_empty_path_as_config_file(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        FinetuneConfig.from_file(tmp_path)
    with pytest.raises(ConfigError, match="path is empty"):
        FinetuneConfig.from_file("")
    with pytest.raises(ConfigError, match="must be a mapping"):
        FinetuneConfig.from_dict(["lora_r", 8])


def test_a_utf8_bom_is_fine(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbflora_r: 8\n")
    assert FinetuneConfig.from_file(path).lora_r == 8


@pytest.mark.parametrize("field", ["learning_rate", "weight_decay"])
def test_rates_past_float32_are_refused_before_adamw_fails_mid_step(field):
    # torch's AdamW raised "value cannot be converted to type float without overflow" at the first step.
    with pytest.raises(ConfigError, match=f"{field}=1e\\+39: .*float32"):
        FinetuneConfig(**{field: 1e39})
    assert getattr(FinetuneConfig(**{field: 3e38}), field) == 3e38
