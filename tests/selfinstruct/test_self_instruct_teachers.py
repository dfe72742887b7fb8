"""Teachers for real: llama.cpp's OpenAI-compatible server (SmolLM2) and a local model folder."""

import json
import logging

import pytest
from rouge_score.tokenizers import DefaultTokenizer
from teacher_server import API_KEY, SEEDS, FaultProxy, free_port, start_llama_server

from alpaca_lora import ConfigError, ModelError, self_instruct
from alpaca_lora.selfinstruct.filters import Rules, rule_verdict
from alpaca_lora.selfinstruct.seeds import Task, load_seed_tasks
from alpaca_lora.selfinstruct.similarity import rouge_l
from alpaca_lora.selfinstruct.teachers import EndpointTeacher, LocalTeacher, Sampling

pytestmark = pytest.mark.slow

KEY_ENV = "ALPACA_LORA_TEST_TEACHER_KEY"


@pytest.fixture(scope="module")
def llama_server(smol_dir, tmp_path_factory):
    """``{"url", "model"}`` of llama.cpp's server on 127.0.0.1 serving SmolLM2 (q8_0); its key in ``KEY_ENV``."""
    pytest.importorskip("llama_cpp.server", reason="bash .ci/install_llama_cpp.sh installs llama.cpp's server")
    from alpaca_lora import export_gguf

    folder = tmp_path_factory.mktemp("teacher")
    gguf = export_gguf(smol_dir, folder / "smol-q8_0.gguf", quantization="q8_0", verify=False)
    proc, url = start_llama_server(gguf, folder / "server.log")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, API_KEY)
        yield {"url": url, "model": "smol"}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def fault_proxy(llama_server):
    """A factory of :class:`FaultProxy` in front of the llama.cpp server, closed after the test."""
    made = []

    def make(faults):
        made.append(FaultProxy(llama_server["url"], faults))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_file(path, threshold=0.7):
    """Every record passes the filters, and no two instructions (seeds included) are over the threshold."""
    records = _records(path)
    rules = Rules(similarity_threshold=threshold)
    assert all(rule_verdict(Task(**r), rules, rules.pattern()) is None for r in records), records
    tokenize = DefaultTokenizer().tokenize
    seeds = [tokenize(t.instruction) for t in load_seed_tasks(SEEDS)]
    kept = [tokenize(r["instruction"]) for r in records]
    for i, a in enumerate(kept):
        assert max(rouge_l(a, b) for b in seeds + kept[:i]) <= threshold, records[i]["instruction"]
    return records


def test_cli_two_step_run_against_the_server_is_resumable(llama_server, tmp_path, capsys, caplog):
    from alpaca_lora.cli.main import main

    out = tmp_path / "generated.jsonl"
    common = [str(SEEDS), llama_server["url"], str(out), "--method", "two_step", "--max_new_tokens", "96",
              "--request_batch_size", "2", "--max_concurrency", "2", "--temperature", "0.7",
              "--api_key_env", KEY_ENV]
    with caplog.at_level(logging.DEBUG):
        assert main(["self-instruct", *common, "--num_instructions", "2"]) == 0
        first = out.read_text()
        assert main(["--quiet", "self-instruct", *common, "--num_instructions", "4"]) == 0  # resumed
    printed = capsys.readouterr().out
    assert "generated.jsonl: 2 tasks kept (done)" in printed and "4 tasks kept (done)" in printed
    records = _check_file(out)
    assert len(records) == 4 and out.read_text().startswith(first)
    assert len({r["instruction"] for r in records}) == 4 and all(r["output"] for r in records)
    report = json.loads((tmp_path / "generated.report.json").read_text())
    assert report["kept"] == 4 and report["status"] == "done" and report["requests"] >= 4
    assert report["teacher"] == f"{llama_server['url']} model smol" and report["answer_tokens"] > 0
    every = printed + caplog.text + (tmp_path / "generated.report.json").read_text() + out.read_text()
    assert API_KEY not in every  # the key is read from the environment and never shown


def test_alpaca_method_against_the_server(llama_server, tmp_path):
    out = tmp_path / "generated.jsonl"
    self_instruct(SEEDS, llama_server["url"], out, num_instructions=2, request_batch_size=2, max_new_tokens=96,
                  patience=2, api_key_env=KEY_ENV, progress=False)
    report = json.loads((tmp_path / "generated.report.json").read_text())
    # SmolLM2-135M rarely writes a whole task in the layout: the run may end for want of progress, but
    # whatever it kept passes the filters, and every request was counted and judged
    assert report["status"] in ("done", "no_progress")
    assert report["requests"] % 2 == 0 and report["requests"] >= 2 and report["answer_tokens"] > 0
    assert report["kept"] + report["rejected_total"] >= 1
    assert len(_check_file(out) if out.exists() else []) == report["kept"]


def test_a_wrong_key_is_refused_naming_the_variable(llama_server, tmp_path, monkeypatch):
    monkeypatch.setenv("OTHER_KEY", "wrong-key")
    with pytest.raises(ConfigError, match="refused the API key \\(HTTP 401\\): set the environment variable "
                                          "OTHER_KEY") as info:
        self_instruct(SEEDS, llama_server["url"], tmp_path / "g.jsonl", api_key_env="OTHER_KEY", progress=False)
    assert "wrong-key" not in str(info.value)


def test_transient_failures_are_retried_then_the_run_goes_on(fault_proxy, tmp_path, caplog):
    proxy = fault_proxy([503, "drop", 429])
    teacher = EndpointTeacher(proxy.url, Sampling(8, 0.7, 1.0), model="smol", api_key_env=KEY_ENV, backoff=0.01)
    with caplog.at_level(logging.WARNING):
        answers = teacher.answer([("Name a color", ":")], seed=0)
    assert len(answers) == 1 and answers[0].tokens and proxy.seen == 4
    assert caplog.text.count("retry") == 3


def test_a_server_that_keeps_failing_ends_with_the_cause(fault_proxy):
    proxy = fault_proxy([503, 503, 503])
    teacher = EndpointTeacher(proxy.url, Sampling(8), model="smol", api_key_env=KEY_ENV, max_retries=2, backoff=0.01)
    with pytest.raises(ModelError, match="failed 3 times in a row; the last error: .*InternalServerError"):
        teacher.answer([("Name a color", ":")], seed=0)


def test_an_unknown_model_lists_the_served_ones(fault_proxy, llama_server):
    proxy = fault_proxy([404])
    teacher = EndpointTeacher(proxy.url, Sampling(8), model="gpt-none", api_key_env=KEY_ENV)
    with pytest.raises(ConfigError, match=r"has no model 'gpt-none' .*models it serves: \['smol'\]"):
        teacher.answer([("Name a color", ":")], seed=0)
    assert EndpointTeacher(llama_server["url"], Sampling(8), api_key_env=KEY_ENV).model == "smol"  # the only one


def test_requests_in_flight_are_bounded(fault_proxy):
    proxy = fault_proxy([])
    teacher = EndpointTeacher(proxy.url, Sampling(4), model="smol", api_key_env=KEY_ENV, concurrency=2)
    answers = teacher.answer([(f"Count to {n}", ":") for n in range(5)], seed=0)
    assert len(answers) == 5 and proxy.seen == 5 and proxy.peak == 2


def test_an_unreachable_server_is_named(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ModelError, match=f"cannot reach the teacher at {url}"):
        self_instruct(SEEDS, url, tmp_path / "g.jsonl", progress=False)


def test_a_local_folder_teacher_writes_records(smol_dir, tmp_path):
    out = tmp_path / "generated.jsonl"
    self_instruct(SEEDS, smol_dir, out, method="two_step", num_instructions=2, request_batch_size=2,
                  max_new_tokens=32, temperature=0.7, compute_dtype="float32", progress=False)
    assert len(_check_file(out)) == 2
    report = json.loads((tmp_path / "generated.report.json").read_text())
    assert report["teacher"] == f"local folder {smol_dir.name}" and report["answer_tokens"] > 0


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_a_local_teacher_says_when_the_limit_cut_an_answer(smol_dir, compute_dtype, api):
    """The precision matrix: the local teacher samples in each compute dtype (autocast on the CPU)."""
    teacher = LocalTeacher(smol_dir, Sampling(max_new_tokens=6, temperature=0.7, api=api), batch_size=2,
                           compute_dtype=compute_dtype)
    answers = teacher.answer([("Task 1: Name a fruit.\n", "Task 2:"), ("Task 1: Add 2 and 3.\n", "Task 2:")], seed=0)
    assert len(answers) == 2 and all(a.text.strip() and a.cut and 5 <= a.tokens <= 7 for a in answers), answers
