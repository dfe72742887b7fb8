"""The eval loss of a model on records' references: mean cross-entropy per response token, as in training.

Records are tokenized as training tokenizes them (:func:`~alpaca_lora.data.prepare.tokenize_instruction`
with the folder's template; conversations with the chat template), so only the response tokens (and
their EOS) take a loss, and the result is comparable with the ``eval_loss`` of a training run.
"""

from __future__ import annotations

from typing import Any


def eval_loss(model_or_dir: Any, items: list[dict[str, Any]], gen: dict[str, Any], batch_size: int) -> float | None:
    """Mean cross-entropy per label token of ``items`` (``request``, ``input``, ``reference``); None if none."""
    import torch

    from alpaca_lora.data.chat import tokenize_conversation
    from alpaca_lora.data.collator import InstructionCollator
    from alpaca_lora.data.prepare import tokenize_instruction
    from alpaca_lora.inference.generate import prompt_template, resolve_model
    from alpaca_lora.model.decoding import answering

    model, tok, folder = resolve_model(model_or_dir, gen.get("tokenizer"), gen.get("quantization"),
                                       gen.get("compute_dtype", "auto"), gen.get("base_model"))
    template = prompt_template(folder, gen.get("template"))
    context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    features = []
    for it in items:
        if isinstance(it["request"], str):
            record = {"instruction": it["request"], "input": it["input"], "output": it["reference"]}
            features.append(tokenize_instruction(record, tok, template, cutoff_len=context))
        else:
            messages = [*it["request"], {"role": "assistant", "content": it["reference"]}]
            features.append(tokenize_conversation(messages, tok, cutoff_len=context))
    collate = InstructionCollator(tok)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with answering(model), torch.no_grad():  # dropout off, also for a model passed in while it trains
        for start in range(0, len(features), batch_size):
            batch = collate(features[start:start + batch_size])
            labels = batch["labels"][:, 1:].to(device)  # (B, T-1): token t+1 is predicted at t
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count if count else None
