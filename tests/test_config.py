"""FinetuneConfig: defaults, collected validation, unknown names, JSON/YAML round trips."""

from __future__ import annotations

import dataclasses

import pytest

from alpaca_lora.config import FinetuneConfig, check_field_names, field_names
from alpaca_lora.errors import ConfigError


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
