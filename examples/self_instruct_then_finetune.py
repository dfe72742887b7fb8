"""Build a data set from seed tasks with a teacher model, then fine-tune on it and score the result.

Stanford Alpaca in one script, on any machine: the 175 Self-Instruct seed tasks -> new tasks written by a
teacher -> ``inspect`` -> ``finetune`` (the embedded SmolLM2-135M, 4-bit + LoRA) -> ``evaluate`` on seed
tasks held out of generation, beside the untuned base.

Usage:
    python examples/self_instruct_then_finetune.py --seeds ../shared/data/self_instruct_seed_tasks.jsonl
    python examples/self_instruct_then_finetune.py --seeds seed_tasks.jsonl --teacher http://127.0.0.1:8080/v1

The teacher defaults to the embedded SmolLM2-135M-Instruct, generating locally (``method="two_step"``:
instructions first, then each answered, which a small model can follow). A real teacher is any
OpenAI-compatible server: llama.cpp's (``python -m llama_cpp.server --model teacher.gguf``), vLLM, Ollama or
OpenAI (key in OPENAI_API_KEY). Run it again with the same --output_dir to resume the generation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from alpaca_lora import default_base_model, evaluate, finetune, inspect_data, self_instruct
from alpaca_lora.selfinstruct.seeds import load_seed_tasks
from alpaca_lora.train.inspection import format_inspection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", required=True, help="seed tasks (.jsonl in Stanford Alpaca's form, or records)")
    parser.add_argument("--teacher", default=None, help="a model folder or an OpenAI-compatible base URL "
                        "(default: the embedded SmolLM2-135M-Instruct, locally)")
    parser.add_argument("--output_dir", default="self-instruct-run")
    parser.add_argument("--num_instructions", type=int, default=200)
    parser.add_argument("--held_out", type=int, default=25, help="seed tasks kept out of generation, to score on")
    parser.add_argument("--method", default="two_step", choices=["alpaca", "two_step"])
    parser.add_argument("--max_steps", type=int, default=40, help="optimizer steps of 16 examples")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = default_base_model()
    summary: dict = {"teacher": str(args.teacher or base.name), "method": args.method}

    seeds = [t.record() for t in load_seed_tasks(args.seeds)]
    held_out, generation_seeds = seeds[-args.held_out:], seeds[:-args.held_out]
    (out / "held_out.json").write_text(json.dumps(held_out, indent=1))

    print(f"[1/4] self-instruct: {args.num_instructions} tasks from {len(generation_seeds)} seed tasks")
    t = time.perf_counter()
    data = self_instruct(generation_seeds, args.teacher or base, out / "generated.jsonl", method=args.method,
                         num_instructions=args.num_instructions, max_new_tokens=192, temperature=0.7,
                         request_batch_size=8, max_concurrency=4)
    report = json.loads((out / "generated.report.json").read_text())
    summary["generation"] = {k: report[k] for k in ("kept", "rejected", "requests", "seconds", "kept_per_minute",
                                                    "answer_tokens_per_second", "kept_max_rouge_l", "status")}
    print(f"      kept {report['kept']}, rejected {report['rejected_total']} in {time.perf_counter() - t:.0f} s")

    print("[2/4] inspect")
    inspection = inspect_data(data, base, cutoff_len=256)
    print(format_inspection(inspection))

    print(f"[3/4] finetune: {args.max_steps} steps on the generated tasks")
    t = time.perf_counter()
    result = finetune(base, data, out / "adapter", max_steps=args.max_steps, batch_size=16, micro_batch_size=8,
                      cutoff_len=256, val_set_size=16, learning_rate=3e-4, lora_target_modules="all-linear",
                      lora_dropout=0.0, gradient_checkpointing=False, group_by_length=False)
    summary["finetune"] = {"seconds": round(time.perf_counter() - t, 1), "train_loss": result.train_loss,
                           "eval_loss": result.eval_loss, "records_kept": result.records_kept}

    print(f"[4/4] evaluate on {len(held_out)} held-out seed tasks, beside the base")
    scores = evaluate(result.adapter_dir, held_out, compare=base, max_new_tokens=96, bootstrap=0)
    print(scores.table())
    summary["evaluation"] = {"tuned": scores.scores, "base": scores.compare.scores if scores.compare else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"summary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
