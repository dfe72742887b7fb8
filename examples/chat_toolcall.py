"""Fine-tune a chat model on ShareGPT tool-calling conversations, then measure it on held-out ones.

Usage (the defaults run on a CPU with the embedded SmolLM2-135M-Instruct in about a quarter of an hour):
    python examples/chat_toolcall.py --data ../shared/data/glaive_toolcall_sharegpt.json --out chat-run

The last conversations of the file are held out. Each is cut before its last assistant turn, and that
turn is what the model must produce. The base and the tuned model answer with the same chat template
(the base's own ChatML; tool calls are rendered as ``<tool_call>`` text, see docs/conversations.md).
Two things are measured:

- stopped: the answer ended with the end-of-turn token before ``max_new_tokens``;
- tool call right: where the reference is a tool call, the answer is one (valid JSON in the
  ``<tool_call>`` block) naming the same function.

The figures are written to ``OUT/chat_toolcall.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from alpaca_lora import default_base_model, finetune, generate, load_data, merge
from alpaca_lora.data.chat_templates import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, resolve_chat_template, template_messages


def held_out_prompts(records: list[dict[str, Any]]) -> list[tuple[list[dict], dict]]:
    """Each conversation cut before its last assistant turn, with that turn as the reference."""
    out = []
    for record in records:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = [{k: m[k] for k in ("role", "content", "tool_call")} for m in messages[:last]]
        out.append(({"messages": prompt, "tools": record["tools"]}, messages[last]))
    return out


def tool_name(text: str) -> str | None:
    """The function a ``<tool_call>`` answer (or a bare JSON call) names; None when it is not a call."""
    body = text.strip()
    if body.startswith(TOOL_CALL_OPEN.strip()):
        body = body[len(TOOL_CALL_OPEN.strip()):].removesuffix(TOOL_CALL_CLOSE.strip()).strip()
    try:
        call = json.loads(body)
    except ValueError:
        return None
    return call.get("name") if isinstance(call, dict) and isinstance(call.get("name"), str) else None


def score(model_dir: Path, prompts: list[tuple[dict, dict]], max_new_tokens: int) -> dict[str, Any]:
    """Answer every held-out prompt with ``model_dir``; count stops and right tool calls."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source = resolve_chat_template(tokenizer)
    conversations = [_with_tools(p, source) for p, _ in prompts]
    start = time.perf_counter()
    answers = generate(model_dir, conversations, max_new_tokens=max_new_tokens, batch_size=8,
                       compute_dtype="float32")
    seconds = time.perf_counter() - start
    stopped = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) < max_new_tokens - 2 for a in answers)
    calls = [(a, ref) for a, (_, ref) in zip(answers, prompts, strict=True) if ref["tool_call"]]
    right = sum(tool_name(a) is not None and tool_name(a) == tool_name(ref["content"]) for a, ref in calls)
    return {"answers": len(answers), "stopped": stopped, "tool_call_references": len(calls),
            "tool_calls_right": right, "generate_s": round(seconds, 1), "sample_answers": answers[:3]}


def _with_tools(prompt: dict, source: str) -> list[dict]:
    """The prompt as training renders it: tool calls as text, the tool schemas in the system message."""
    messages = [{**m, "train": True} for m in prompt["messages"]]
    return template_messages(messages, prompt["tools"], source)[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a ShareGPT or messages file")
    parser.add_argument("--out", default="chat-run", help="folder for the adapter, merged model and results")
    parser.add_argument("--base_model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--held_out", type=int, default=20)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--cutoff_len", type=int, default=512)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args(argv)

    out = Path(args.out)
    base = Path(args.base_model) if args.base_model else default_base_model()
    ds, data_format = load_data(args.data)
    train, held = ds.select(range(len(ds) - args.held_out)), ds.select(range(len(ds) - args.held_out, len(ds)))
    tokenizer = AutoTokenizer.from_pretrained(base)
    source = resolve_chat_template(tokenizer)
    every = held_out_prompts(held.to_list())
    prompts = [(p, ref) for p, ref in every  # those whose prompt and answer fit the trained length
               if _prompt_tokens(tokenizer, source, p) + args.max_new_tokens <= args.cutoff_len]
    before = score(base, prompts, args.max_new_tokens)
    result = finetune(base, train, out / "adapter", max_steps=args.max_steps, batch_size=8, micro_batch_size=4,
                      learning_rate=5e-4, cutoff_len=args.cutoff_len, val_set_size=0, lora_target_modules="all-linear")
    merged = merge(result.adapter_dir, out / "merged")
    after = score(merged, prompts, args.max_new_tokens)
    report = {
        "data": str(args.data), "data_format": data_format, "train_conversations": len(train),
        "held_out": len(every), "scored": len(prompts), "base_model": str(base), "max_steps": result.steps,
        "train_loss_first_last": _first_last(result.adapter_dir), "tokens_seen": result.tokens_seen,
        "finetune_s": round(result.runtime_s, 1), "compute_dtype": result.compute_dtype,
        "base": before, "tuned": after, "machine": {"cpu": _cpu(), "python": platform.python_version()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_toolcall.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in ("base", "tuned"):
        s = report[name]
        print(f"{name}: stopped {s['stopped']}/{s['answers']}, tool calls right {s['tool_calls_right']}/"
              f"{s['tool_call_references']}")
    return report


def _prompt_tokens(tokenizer: Any, source: str, prompt: dict) -> int:
    text = tokenizer.apply_chat_template(_with_tools(prompt, source), chat_template=source, tokenize=False,
                                         add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _first_last(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return [round(losses[0], 4), round(losses[-1], 4)] if losses else []


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
