"""The ``alpaca-lora`` command, run as a user runs it: ``python -m alpaca_lora ...`` in a subprocess."""

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from alpaca_lora import FinetuneConfig, estimate_memory
from alpaca_lora.cli.flags import field_docs
from alpaca_lora.cli.main import main
from alpaca_lora.export.hub import export_files
from alpaca_lora.train.inspection import inspect_data
from alpaca_lora.train.memory import GIB
from fakes import TOKEN, FakeHub


def run_main(*args):
    """Run ``main`` in this process (for usage checks that need no fresh interpreter)."""
    return main(["--quiet", *map(str, args)])


def cli(*args, env=None, timeout=300):
    """Run the command in a fresh interpreter; return (exit status, stdout, stderr)."""
    run = subprocess.run([sys.executable, "-m", "alpaca_lora", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=timeout)
    return run.returncode, run.stdout, run.stderr


@pytest.fixture(scope="module")
def records():
    return [{"instruction": f"Add {i} and {i + 1}.", "input": f"numbers {i}" if i % 2 else "",
             "output": str(2 * i + 1)} for i in range(24)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(records))
    return path


def test_finetune_help_lists_every_field_with_doc_and_default():
    code, out, _ = cli("finetune", "--help")
    assert code == 0
    flat = " ".join(out.split())
    docs = field_docs(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        assert f"--{f.name}" in out, f.name
        assert " ".join(docs[f.name].replace("``", "").split())[:40] in flat, f.name
        assert f"(default: {f.default!r})" in flat, f.name
    for flag in ("--base_model", "--data", "--output_dir", "--config"):
        assert flag in out


def test_unknown_flag_is_a_usage_error_with_close_matches():
    code, out, err = cli("finetune", "--base_model", "m", "--data", "d.json", "--lora_rank", "8", "--micro-batchsize",
                         "2")
    assert code == 2 and out == ""
    assert "--lora_rank (did you mean --lora_r" in err and "--micro_batch_size" in err
    assert "Traceback" not in err


def test_bad_data_file_fails_in_one_line_naming_the_file(tiny_model_dir, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"instruction": "x", "output": "y"},')
    code, out, err = cli("finetune", "--base_model", tiny_model_dir, "--data", bad, "--output_dir", tmp_path / "o")
    assert code == 1 and out == ""
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("alpaca-lora finetune: error:") and str(bad) in last and "line 1" in last
    assert not (tmp_path / "o").exists()  # failed before the model loaded or anything was written


@pytest.mark.slow
def test_finetune_merge_generate_push(tiny_model_dir, data_file, tmp_path):
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(yaml.safe_dump({"lora_r": 4, "cutoff_len": 64, "batch_size": 4, "micro_batch_size": 2,
                                       "val_set_size": 4}))
    out_dir = tmp_path / "adapter"
    code, out, err = cli("finetune", "--base_model", tiny_model_dir, "--data", data_file, "--output_dir", out_dir,
                         "--config", run_cfg, "--lora_r", "8", "--max-steps", "2", "--train_on_inputs")
    assert code == 0, err[-3000:]
    result = json.loads(out)
    assert result["steps"] == 2 and result["records_kept"] == 20
    saved = json.loads((out_dir / "finetune_config.json").read_text())
    assert saved["lora_r"] == 8 and saved["cutoff_len"] == 64 and saved["train_on_inputs"] is True  # flag > file
    # The preflight summary comes before training starts.
    pre = err[err.index("preflight:"):]
    assert err.index("preflight:") < err.index("finetune:")
    assert "4-bit NF4" in pre and "20 kept for training, 0 dropped" in pre and "4 held out" in pre
    assert "2 optimizer steps of 4 examples (2 micro-batches of 2)" in pre and "GiB estimated peak" in pre
    trainable = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))  # layers x r x (in + out) of q, k, v, o
    assert f"trainable     {trainable:,} of" in pre

    merged = tmp_path / "merged"
    code, out, err = cli("merge", out_dir, merged, "--dtype", "float32")
    assert code == 0, err[-3000:]
    assert f"-> {merged}" in out and "verification:" in out
    assert (merged / "model.safetensors").is_file()

    code, out, err = cli("generate", merged, "Add 2 and 3.", "Add 4 and 5.", "--max_new_tokens", "4")
    assert code == 0, err[-3000:]
    from alpaca_lora import generate

    assert out.splitlines() == generate(merged, ["Add 2 and 3.", "Add 4 and 5."], max_new_tokens=4)

    hub = FakeHub()
    try:
        code, out, err = cli("push", merged, "me/tiny", "--private", "false",
                             env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
                                  "HF_HOME": str(tmp_path / "hf"), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
    finally:
        hub.server.shutdown()
    assert code == 0, err[-3000:]
    assert sorted(hub.files["me/tiny"]) == export_files(merged)
    assert hub.repos["me/tiny"]["visibility"] == "public"
    assert f"uploaded {len(export_files(merged))} file(s)" in out and TOKEN not in out + err


def test_push_dry_run_and_missing_folder(tmp_path, capsys):
    assert run_main("push", tmp_path / "nothing", "me/x", "--dry_run") == 1
    assert "no model weights" in capsys.readouterr().err


def test_inspect_reports_bad_records_lengths_and_mask(tiny_model_dir, records, tmp_path):
    rows = [*records[:10], {"instruction": "Tell a long story.", "input": "", "output": "word " * 200}]
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, '{"instruction": "no output"}')
    lines.insert(6, "{not json")
    path.write_text("\n".join(lines) + "\n")
    code, out, err = cli("inspect", path, "--base-model", tiny_model_dir, "--cutoff-len", "96")
    assert code == 0, err[-3000:]
    report = inspect_data(path, tiny_model_dir, cutoff_len=96)
    assert report.records == 13 and len(report.bad_records) == 2 and report.good_records == 11
    assert "13 read, 11 good, 2 bad" in out
    assert f"{path} line 4" in out and f"{path} line 7" in out  # bad records named by file and line
    lp = report.length_percentiles
    assert f"p50 {lp['p50']}  p90 {lp['p90']}  p99 {lp['p99']}  max {lp['max']}" in out
    assert lp["max"] > 96 and report.over_cutoff == 1 and report.truncated == 1 and report.kept == 11
    assert "11 kept, 1 of them truncated" in out
    # The example's masked prompt is in [[...]], and only the response + EOS follow it.
    assert report.example.startswith("[[") and report.example.endswith("<|im_end|>")
    assert report.example in out and "### Response:" in report.example.split("]]")[0]


def test_inspect_bad_file_and_config_fields(tiny_model_dir, data_file, tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert run_main("inspect", missing, "--base_model", tiny_model_dir) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"cutoff_len": 32, "train_on_inputs": True}))
    assert run_main("inspect", data_file, "--base_model", tiny_model_dir, "--config", cfg) == 0
    out = capsys.readouterr().out
    assert "cutoff_len: 32   train_on_inputs: True" in out and "[[" not in out  # nothing masked
    cfg.write_text(json.dumps({"cutof_len": 32}))
    assert run_main("inspect", data_file, "--base_model", tiny_model_dir, "--config", cfg) == 2
    assert "did you mean cutoff_len" in capsys.readouterr().err


def test_a_command_logs_to_stderr_and_leaves_no_handler_behind(monkeypatch, tmp_path, capsys):
    """In-process ``main`` (a notebook, a test) shows INFO messages, then undoes its handler and level."""
    import alpaca_lora.cli.main as cli_main

    def cache_that_logs(args):
        logging.getLogger("alpaca_lora.data").info("a message at INFO")
        return 0

    monkeypatch.setitem(cli_main._COMMANDS, "cache", cache_that_logs)
    log = logging.getLogger("alpaca_lora")
    before = (list(log.handlers), log.level)
    assert main(["cache", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == "a message at INFO\n" and (log.handlers, log.level) == before
    assert main(["--quiet", "cache", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().err == "" and (log.handlers, log.level) == before
    own = logging.StreamHandler()  # a caller's own handler is left as it is, and used
    log.addHandler(own)
    try:
        assert main(["cache", "--dir", str(tmp_path)]) == 0 and log.handlers == [*before[0], own]
    finally:
        log.removeHandler(own)


def test_estimate_fits_or_says_what_to_change(tiny_model_dir, capsys):
    code, out, err = cli("estimate", "--base-model", tiny_model_dir, "--micro_batch_size", "8",
                         "--batch_size", "16", "--gpu-memory", "1.3GB", "--compute_dtype", "float32")
    assert code == 0, err[-3000:]
    est = estimate_memory(tiny_model_dir, micro_batch_size=8, batch_size=16, compute_dtype="float32")
    assert f"{est.total / GIB:8.3f} GiB" in out
    assert "does NOT fit" in out and "loss_chunk_size=256" in out
    assert run_main("estimate", "--base_model", tiny_model_dir, "--gpu_memory", "24GB") == 0
    assert "fits: estimated peak" in capsys.readouterr().out
    assert run_main("estimate", "--base_model", tiny_model_dir, "--gpu_memory", "lots") == 2
    assert "gpu_memory='lots'" in capsys.readouterr().err
    assert run_main("estimate", "--base_model", tiny_model_dir, "--quantization", "nf5") == 2
    assert "did you mean 'nf4'" in capsys.readouterr().err


def test_flags_come_from_signatures_and_docstrings():
    import inspect

    from alpaca_lora import generate, merge
    from alpaca_lora.cli.flags import converter, docstring_args
    from alpaca_lora.cli.main import build_parser

    docs = docstring_args(merge)
    assert set(docs) == set(inspect.signature(merge).parameters)
    assert docs["max_shard_size"].startswith("Largest safetensors shard") and "1GiB" in docs["max_shard_size"]
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    gen_flags = set(sub["generate"].known_flags())
    for name, p in inspect.signature(generate).parameters.items():
        if p.kind is p.KEYWORD_ONLY and name != "tokenizer":
            assert f"--{name}" in gen_flags, name
    assert "--token" not in sub["push"].known_flags()  # a token never goes on a command line
    hints = inspect.get_annotations(generate, eval_str=True)
    assert converter(hints["instruction"])("42") == "42" and converter(hints["input"])("null") is None
    assert converter(hints["top_k"])("null") is None and converter(hints["top_k"])("5") == 5
    fields = inspect.get_annotations(FinetuneConfig, eval_str=True)
    assert converter(fields["lora_target_modules"])('["q_proj", "v_proj"]') == ["q_proj", "v_proj"]
    assert converter(fields["lora_target_modules"])("attention") == "attention"
    assert converter(fields["val_set_size"])("100") == 100.0


# ---- hardening (issue #19) ----------------------------------------------------------------------


def test_finetune_without_output_dir_takes_the_documented_default(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert run_main("finetune", "--base_model", tmp_path / "no-model", "--data", missing) == 1
    err = capsys.readouterr().err
    assert "AttributeError" not in err and str(missing) in err  # it got as far as reading the data
    assert not (tmp_path / "lora-alpaca").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (("merge", "{tmp}/adapter", "{tmp}/out", "--dtype", "float8"), "dtype='float8'"),
    (("generate", "{tmp}/model", "Hi.", "--max_new_tokens", "0"), "max_new_tokens=0"),
    (("generate", "{tmp}/model", "Hi.", "--temperature", "0.5"), "do_sample"),
    (("demo", "--budget", "huge", "--output_dir", "{tmp}/demo"), "budget='huge'"),
    (("demo", "--learning_rate", "nan", "--output_dir", "{tmp}/demo"), "learning_rate=nan"),
    (("demo", "--n_test", "0", "--output_dir", "{tmp}/demo"), "n_test=0"),
    (("finetune", "--base_model", "m", "--data", "d.json", "--num_epochs", "inf"), "num_epochs=inf"),
    (("finetune", "--base_model", "m", "--data", "d.json", "--lora_r", "1000000000"), "lora_r=1000000000"),
    (("estimate", "--base_model", "m", "--seed", "-1"), "seed=-1"),
])
def test_a_config_error_from_the_called_function_is_a_usage_error_in_one_line(tmp_path, capsys, args, needle):
    code = run_main(*(a.format(tmp=tmp_path) for a in args))
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err and "--debug" not in err
    assert not (tmp_path / "demo").exists()


def test_a_billion_laughs_config_exits_2_quickly_with_a_short_message(tmp_path, capsys):
    import time

    from fakes import billion_laughs

    bomb = billion_laughs(tmp_path / "bomb.yaml")
    start = time.perf_counter()
    code = run_main("finetune", "--base_model", "m", "--data", "d.json", "--config", bomb)
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - start < 5
    assert len(err) < 4000 and str(bomb) in err and "YAML aliases" in err


def test_config_file_problems_are_usage_errors(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("report_to: 'café'\n".encode("latin-1"))
    for config, needle in ((latin, "not UTF-8"), (tmp_path, "is a folder"), ("", "path is empty")):
        assert run_main("finetune", "--base_model", "m", "--data", "d.json", "--config", config) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err


def test_flag_errors_quote_a_bounded_part_of_a_huge_value(tmp_path, capsys):
    huge = "9" * 100_000
    for args in (("--lora_r", "x" + huge), ("--train_on_inputs", huge), ("--" + huge, "1"), ("x" * 100_000,)):
        with pytest.raises(SystemExit) as info:  # argparse's own errors
            run_main("finetune", "--base_model", "m", "--data", "d.json", *args)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert len(err) < 4000 and "Traceback" not in err
    missing = tmp_path / "missing.json"  # JSON nested past Python's stack is text, the data error comes first
    assert run_main("finetune", "--base_model", "m", "--data", missing, "--lora_target_modules", "[" * 100_000) == 1
    err = capsys.readouterr().err
    assert len(err) < 4000 and str(missing) in err


# ---- conversations ------------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "Say red."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Say blue."},
     {"role": "assistant", "content": "blue"}, {"role": "user", "content": "Again."}],
]


def _answers(texts):
    """What the command prints for ``texts``: one answer per line, as print() writes them."""
    return "".join(f"{t}\n" for t in texts)


def test_generate_answers_the_conversations_of_a_messages_file(tiny_model_dir, tmp_path, capsys):
    from alpaca_lora import generate

    expected = generate(tiny_model_dir, CHATS, max_new_tokens=4)
    one, many, lines = tmp_path / "one.json", tmp_path / "many.json", tmp_path / "chats.jsonl"
    one.write_text(json.dumps(CHATS[1]))
    many.write_text(json.dumps(CHATS))
    lines.write_text("\n".join(json.dumps(c) for c in CHATS) + "\n")
    assert run_main("generate", tiny_model_dir, "--messages", one, "--max_new_tokens", "4") == 0
    assert capsys.readouterr().out == _answers(expected[1:])
    for path in (many, lines):
        assert run_main("generate", tiny_model_dir, "--messages", path, "--max_new_tokens", "4") == 0
        assert capsys.readouterr().out == _answers(expected)
    assert run_main("generate", tiny_model_dir, "--messages", one, "--max_new_tokens", "4", "--chat-template",
                    "alpaca") == 0
    assert capsys.readouterr().out == _answers([generate(tiny_model_dir, CHATS[1], max_new_tokens=4,
                                                         chat_template="alpaca")])
    assert run_main("generate", tiny_model_dir, "--messages", one, "--max_new_tokens", "4", "--stream") == 0
    assert capsys.readouterr().out == _answers(expected[1:])


def test_generate_prompts_a_training_record_with_the_turns_before_its_last_answer(tiny_model_dir, tmp_path,
                                                                                  capsys):
    from alpaca_lora import generate

    records = [{"messages": [*CHATS[1], {"role": "assistant", "content": "blue blue"}]},
               {"messages": [*CHATS[0], {"role": "assistant", "content": "red"}]}]
    sharegpt = [{"conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"},
                                   {"from": "human", "value": "Again."}, {"from": "gpt", "value": "red red"}]}]
    messages, share = tmp_path / "train.jsonl", tmp_path / "share.json"
    messages.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    share.write_text(json.dumps(sharegpt))
    assert run_main("generate", tiny_model_dir, "--messages", messages, "--max_new_tokens", "4") == 0
    assert capsys.readouterr().out == _answers(generate(tiny_model_dir, [CHATS[1], CHATS[0]], max_new_tokens=4))
    prompt = [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red"},
              {"role": "user", "content": "Again."}]
    assert run_main("generate", tiny_model_dir, "--messages", share, "--max_new_tokens", "4") == 0
    assert capsys.readouterr().out == _answers([generate(tiny_model_dir, prompt, max_new_tokens=4)])


@pytest.mark.parametrize(("content", "needles"), [
    ('[{"role": "user", "content": "Hi"},', ["line 1", "not valid JSON"]),
    ('[{"role": "user", "content": "Hi"}]\n[{"role": "robot", "content": "Hi"}]\n', ["line 2", "unknown role"]),
    ('[{"role": "user", "content": "Hi"}]\n{"not": "a list"}\n', ["line 2", "non-empty list of messages"]),
    ('{"instruction": "Say red.", "output": "red"}\n', ["holds no conversations", "as arguments"]),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
     '{"messages": [{"role": "user", "content": "Hi"}]}\n', ["line 2", "no assistant turn", "before its last"]),
    ('{"messages": [{"role": "user", "content": "Hi"}]}\n', ["line 1", "no assistant turn"]),
    ('{"messages": [{"role": "assistant", "content": "Hi"}]}\n', ["line 1", "the first turn is the assistant's"]),
    ('{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]}\n',
     ["line 1, turn 1", "unknown role 'bot'"]),
])
def test_a_bad_messages_file_fails_in_one_line_naming_it(tiny_model_dir, tmp_path, capsys, content, needles):
    path = tmp_path / "chats.jsonl"
    path.write_text(content)
    assert run_main("generate", tiny_model_dir, "--messages", path) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    line = captured.err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("alpaca-lora generate: error:") and str(path) in line
    for needle in needles:
        assert needle in line


@pytest.mark.parametrize(("args", "needle"), [
    (("Hi.", "--messages", "{tmp}/c.json"), "not both"),
    ((), "give one or more instructions, or --messages"),
    (("Hi.", "--chat_template", "chatml"), "--chat_template renders conversations"),
    (("--messages", "{tmp}/c.json", "--template", "alpaca"), "--template renders instructions"),
    (("--messages", "{tmp}/c.json", "--stream"), "--stream answers one request, and there are 2"),
])
def test_generate_usage_errors_for_instructions_and_messages(tiny_model_dir, tmp_path, capsys, args, needle):
    (tmp_path / "c.json").write_text(json.dumps(CHATS))
    assert run_main("generate", tiny_model_dir, *(a.format(tmp=tmp_path) for a in args)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_finetune_flags_include_the_data_format_and_chat_template():
    from alpaca_lora.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    flags = set(sub["finetune"].known_flags())
    assert {"--data_format", "--data-format", "--chat_template", "--chat-template"} <= flags
    assert {"--messages", "--chat_template", "--chat-template"} <= set(sub["generate"].known_flags())


def test_inspect_conversations_with_the_data_format_and_chat_template_flags(tiny_model_dir, tmp_path, capsys):
    from alpaca_lora.train.inspection import format_inspection

    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [*c, {"role": "assistant", "content": "blue"}]})
                              for c in CHATS) + "\n")
    expected = format_inspection(inspect_data(path, tiny_model_dir, cutoff_len=256, data_format="messages",
                                              chat_template="chatml"))
    assert run_main("inspect", path, "--base_model", tiny_model_dir, "--cutoff-len", "256", "--data-format",
                    "messages", "--chat-template", "chatml") == 0
    out = capsys.readouterr().out
    assert out == expected + "\n"
    assert "chat template: chatml" in out and "3 assistant turns trained" in out and "]]blue<|im_end|>" in out
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"cutoff_len": 256, "data_format": "messages", "chat_template": "chatml"}))
    assert run_main("inspect", path, "--base_model", tiny_model_dir, "--config", cfg) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert run_main("inspect", path, "--base_model", tiny_model_dir, "--data_format", "alpaca") == 1
    err = capsys.readouterr().err
    assert str(path) in err and "format='alpaca' does not fit the columns" in err  # finetune's error
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_finetune_on_conversations_ships_a_chat_template_and_generate_answers_them(tiny_model_dir, tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
             for w in "red blue green cat dog sun moon tree".split()]
    data, out_dir = tmp_path / "chats.jsonl", tmp_path / "adapter"
    data.write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    code, out, err = cli("finetune", "--base_model", tiny_model_dir, "--data", data, "--output_dir", out_dir,
                         "--data-format", "messages", "--chat-template", "chatml", "--max_steps", "2",
                         "--batch_size", "4", "--micro_batch_size", "2", "--val_set_size", "0", "--cutoff_len", "64")
    assert code == 0, err[-3000:]
    assert json.loads(out)["steps"] == 2
    assert (out_dir / "chat_template.jinja").is_file() and not (out_dir / "prompt_template.json").exists()
    saved = json.loads((out_dir / "finetune_config.json").read_text())
    assert saved["data_format"] == "messages" and saved["chat_template"] == "chatml"
    from alpaca_lora import generate
    from alpaca_lora.data.chat_templates import CHATML

    assert (out_dir / "chat_template.jinja").read_text() == CHATML
    code, out, err = cli("generate", out_dir, "--messages", data, "--max_new_tokens", "4")
    assert code == 0, err[-3000:]
    prompts = [c["messages"][:1] for c in chats]
    assert out == _answers(generate(out_dir, prompts, max_new_tokens=4))


def test_eval_writes_report_and_records_to_two_files_whatever_the_output_suffix(tiny_model_dir, records, tmp_path):
    data = tmp_path / "held.json"
    data.write_text(json.dumps(records[:3]))
    for output, rows_file in (("r.json", "r.jsonl"), ("r2.jsonl", "r2.records.jsonl")):
        code, out, err = cli("eval", tiny_model_dir, data, "--max_new_tokens", "2", "--compute_dtype", "float32",
                             "--output", tmp_path / output)
        assert code == 0, err[-2000:]
        report = json.loads((tmp_path / output).read_text())
        assert report["settings"]["records"] == 3 and "exact_match" in report["scores"]
        rows = [json.loads(line) for line in (tmp_path / rows_file).read_text().splitlines()]
        assert [r["reference"] for r in rows] == [r["output"] for r in records[:3]]
