"""Generation metrics while training: a fixed sample of the validation split answered greedily at each eval.

With ``eval_generate_samples > 0``, every evaluation also answers the first that many validation records
(the same ones each time) with greedy decoding and scores the answers with exact match, BLEU, ROUGE-L and
chrF (:mod:`alpaca_lora.data.metrics`). A record's prompt and reference come from its tokenized form: the
reference is its last labelled span (the response, or the last assistant turn, without its end token) and
the prompt everything before it, so the model is asked exactly what training showed it. The scores go to
``metrics.jsonl`` (``eval_exact_match``, ``eval_bleu``, ...), TensorBoard / Weights & Biases, the second
panel of ``loss.png``, ``train_results.json`` and the merged model's card.
"""

from __future__ import annotations

import time
from typing import Any

from alpaca_lora.data.labels import IGNORE_INDEX
from alpaca_lora.data.metrics import METRICS, corpus_scores

PREFIX = "eval_"
GENERATION_KEYS = tuple(PREFIX + m for m in METRICS)
"""The metric names a run logs, in ``metrics.jsonl`` and ``train_results.json``."""


def generation_sample(val_set: Any, n: int, tokenizer: Any) -> list[tuple[list[int], str]]:
    """``(prompt ids, reference text)`` of the first ``n`` validation records that have a labelled span."""
    out = []
    for i in range(min(n, len(val_set))):
        row = val_set[i]
        ids, labels = list(row["input_ids"]), list(row["labels"])
        end = max((t for t, lab in enumerate(labels) if lab != IGNORE_INDEX), default=None)
        if end is None:
            continue
        start = end
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        if start == 0:  # trained on the whole text: no prompt to ask with (train_on_inputs; refused by the config)
            continue
        out.append((ids[:start], tokenizer.decode(ids[start:end + 1], skip_special_tokens=True).strip()))
    return out


def generation_scores(run: Any, sample: list[tuple[list[int], str]]) -> dict[str, float]:
    """Answer ``sample`` with the model being trained and return ``{"eval_exact_match": ..., ...}``."""
    from alpaca_lora.data.chat import end_of_turn_ids
    from alpaca_lora.model.decoding import generate_batches

    tok = run.tokenizer
    eos = [tok.eos_token_id, *(end_of_turn_ids(tok, run.chat_template) if run.chat_template else [])]
    kwargs = {"max_new_tokens": run.cfg.eval_generate_max_new_tokens, "do_sample": False,
              "eos_token_id": list(dict.fromkeys(eos)),
              "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    start = time.perf_counter()
    with run.strategy.guard("generation metrics"):
        texts = generate_batches(run.model, tok, [p for p, _ in sample], kwargs, run.cfg.micro_batch_size, None)
    scores = corpus_scores(texts, [r for _, r in sample], METRICS, bootstrap=0).scores
    return {**{PREFIX + k: v for k, v in scores.items()}, "eval_generate_s": round(time.perf_counter() - start, 3)}
