"""Generation metrics during training: the asked prompts, the logged scores, the plot, results and model card."""

import json
import os
import subprocess
import sys

import pytest

from alpaca_lora import ConfigError, FinetuneConfig, finetune, merge
from alpaca_lora.data.prepare import tokenize_instruction, tokenize_prompt
from alpaca_lora.data.prompts import get_template
from alpaca_lora.inference.evaluate import evaluate
from alpaca_lora.train.generation_eval import GENERATION_KEYS, generation_sample
from conftest import SHORT_RECORDS


def test_the_sample_asks_the_training_prompt_and_expects_the_response(smol_tokenizer):
    import datasets

    template = get_template("alpaca")
    rows = [tokenize_instruction(r, smol_tokenizer, template, cutoff_len=128) for r in SHORT_RECORDS]
    sample = generation_sample(datasets.Dataset.from_list(rows), 5, smol_tokenizer)
    assert len(sample) == 5
    for (prompt, reference), record in zip(sample, SHORT_RECORDS, strict=False):
        assert prompt == tokenize_prompt(template.render(record["instruction"], record["input"] or None),
                                         smol_tokenizer)
        assert reference == record["output"]  # the end-of-text token is not part of the answer


def test_config_refuses_generation_metrics_it_cannot_compute():
    with pytest.raises(ConfigError, match="val_set_size=0: there is no validation split"):
        FinetuneConfig(eval_generate_samples=4, val_set_size=0)
    with pytest.raises(ConfigError, match="train_on_inputs=True"):
        FinetuneConfig(eval_generate_samples=4, train_on_inputs=True)
    assert FinetuneConfig().eval_generate_samples == 0  # off by default: the eval loss stays the default


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16", "float16"])
def test_scores_are_logged_at_each_evaluation_and_reach_results_and_card(tiny_model_dir, tmp_path, compute_dtype):
    out = tmp_path / "run"
    result = finetune(tiny_model_dir, SHORT_RECORDS * 4, out, max_steps=4, batch_size=4, micro_batch_size=4,
                      val_set_size=8, eval_steps=2, eval_generate_samples=3, eval_generate_max_new_tokens=6,
                      cutoff_len=64, compute_dtype=compute_dtype, quantization="nf4", learning_rate=1e-3)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(set(GENERATION_KEYS) <= e.keys() and e["eval_generate_s"] > 0 for e in evals)
    assert result.eval_scores == {k: evals[-1][k] for k in GENERATION_KEYS}
    assert 0 <= result.eval_scores["eval_exact_match"] <= 1 and 0 <= result.eval_scores["eval_chrf"] <= 100
    saved = json.loads((out / "train_results.json").read_text())
    assert saved["eval_scores"] == result.eval_scores
    from PIL import Image

    assert Image.open(out / "loss.png").size[0] > 1000  # a second panel for the generation metrics
    if compute_dtype == "float32":
        card = (merge(out, tmp_path / "merged", dtype="float32") / "README.md").read_text()
        assert '"eval_chrf"' in card


_SAME_RUN_TWICE = """
import json, sys
from alpaca_lora import finetune
model_dir, records, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
losses = {}
for samples in (0, 3):
    finetune(model_dir, records, f"{out}/run{samples}", max_steps=4, batch_size=4, micro_batch_size=2,
             val_set_size=8, eval_steps=1, eval_generate_samples=samples, eval_generate_max_new_tokens=4,
             cutoff_len=64, compute_dtype="float32", quantization="nf4", lora_dropout=0.1, seed=3,
             cpu_matmul="blas")
    rows = [json.loads(line) for line in open(f"{out}/run{samples}/metrics.jsonl")]
    losses[samples] = [r.get("loss", r.get("eval_loss")) for r in rows]
print(json.dumps(losses))
"""


def test_answering_during_training_leaves_training_unchanged(tiny_model_dir, tmp_path):
    """Same seed, with and without generation metrics: bit-identical losses, step by step (dropout on).

    Run in a child with one thread and MKL's reproducible mode (``MKL_CBWR``): otherwise MKL's sums may
    round differently when generation has moved the buffers to other addresses, which is not a change
    of training.
    """
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", _SAME_RUN_TWICE, str(tiny_model_dir),
                            json.dumps(SHORT_RECORDS * 4), str(tmp_path)],
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    losses = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(losses["0"]) >= 8 and all(x > 0 for x in losses["0"])  # 4 training and 4 evaluation losses
    assert losses["0"] == losses["3"]


def test_answering_leaves_the_rng_the_mode_and_the_weights_as_they_were(tiny_model_dir, tmp_path):
    """The direct invariants behind the test above: no random draw, training mode back on, no weight touched."""
    import torch

    from alpaca_lora.train import generation_eval

    seen = {}

    def capture(run, sample):
        model = run.model
        before = (torch.get_rng_state(), model.training, {k: v.clone() for k, v in model.state_dict().items()})
        scores = real(run, sample)
        after = (torch.get_rng_state(), model.training, model.state_dict())
        seen["checked"] = True
        assert torch.equal(before[0], after[0]), "generation drew from the global random generator"
        assert before[1] is True and after[1] is True, "the model left in eval mode after generation"
        assert all(torch.equal(v, after[2][k]) for k, v in before[2].items()), "generation changed a weight"
        return scores

    real = generation_eval.generation_scores
    finetune_with = pytest.MonkeyPatch()
    finetune_with.setattr("alpaca_lora.train.recipe.generation_scores", capture)
    try:
        finetune(tiny_model_dir, SHORT_RECORDS * 4, tmp_path / "run", max_steps=2, batch_size=4,
                 micro_batch_size=2, val_set_size=8, eval_steps=1, eval_generate_samples=3,
                 eval_generate_max_new_tokens=4, cutoff_len=64, compute_dtype="float32", quantization="nf4",
                 lora_dropout=0.1, seed=3, cpu_matmul="blas")  # the fused LoRA layers' path
    finally:
        finetune_with.undo()
    assert seen.get("checked")


def test_off_by_default_logs_loss_only(tiny_model_dir, tmp_path):
    result = finetune(tiny_model_dir, SHORT_RECORDS * 2, tmp_path / "run", max_steps=2, batch_size=4,
                      micro_batch_size=4, val_set_size=4, cutoff_len=64, compute_dtype="float32", quantization=None)
    assert result.eval_scores == {} and result.eval_loss is not None
    assert not any("eval_bleu" in line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16", "float16"])
def test_evaluate_in_each_precision(tiny_model_dir, compute_dtype):
    report = evaluate(tiny_model_dir, SHORT_RECORDS[:3], max_new_tokens=4, compute_dtype=compute_dtype, bootstrap=0)
    assert report.scores["eval_loss"] > 0 and report.scores["perplexity"] < float("inf")
    assert len(report.rows) == 3 and all(isinstance(r["prediction"], str) for r in report.rows)
