"""GGUF export of the demo's merged model, scored in llama.cpp against the merged model in transformers.

The demo (``alpaca-lora demo``) fine-tunes the embedded SmolLM2-135M and merges it; this script exports
the merged folder as GGUF in several quantizations (timing each and keeping its verification figures),
lets llama.cpp (llama-cpp-python) answer the demo's held-out tasks greedily with the training prompt,
and scores the answers by the demo's exact match, beside the merged model's own score from the same run.

    python benchmarks/gguf_export.py --demo_dir alpaca-lora-demo

Writes ``benchmarks/results/gguf_export.json`` and ``gguf_export.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
QUANTIZATIONS = ("f16", "q8_0", "q6_k", "q4_k_m", "q4_0")


def machine() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "amx": "amx_tile" in text, "python": platform.python_version(),
            "platform": platform.platform()}


def llama_cpp_answers(path: Path, prompts: list[str]) -> tuple[list[str], float]:
    """Greedy answers of llama.cpp to each prompt (24 new tokens at most, stopped at EOS), and the seconds taken."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=os.cpu_count(), verbose=False, seed=0)
    try:
        start = time.perf_counter()
        answers = [llm.create_completion(p, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
                   for p in prompts]
        return answers, time.perf_counter() - start
    finally:
        llm.close()


def main() -> None:
    from alpaca_lora import export_gguf, generate
    from alpaca_lora.data.prompts import get_template
    from alpaca_lora.demo.run import DemoConfig
    from alpaca_lora.demo.tasks import score_predictions, train_test_tasks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo_dir", default="alpaca-lora-demo", help="output_dir of an `alpaca-lora demo` run")
    parser.add_argument("--out_dir", default=None, help="where the GGUF files go (default: DEMO_DIR/gguf)")
    parser.add_argument("--build_s", type=float, default=None, help="measured build time of llama-cpp-python")
    args = parser.parse_args()
    demo = Path(args.demo_dir)
    merged = demo / "merged"
    out_dir = Path(args.out_dir) if args.out_dir else demo / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = DemoConfig()
    _, test = train_test_tasks(cfg.n_train, cfg.n_test, seed=cfg.seed)
    template = get_template(json.loads((merged / "prompt_template.json").read_text()))
    prompts = [template.render(r["instruction"], r["input"] or None) for r in test]

    start = time.perf_counter()
    reference = generate(str(merged), [r["instruction"] for r in test], [r["input"] for r in test],
                         max_new_tokens=24, batch_size=16)
    ref_s = time.perf_counter() - start
    ref_score = score_predictions(test, reference)["overall"]
    rows = []
    for q in QUANTIZATIONS:
        t = time.perf_counter()
        path = export_gguf(merged, out_dir / f"demo-{q}.gguf", quantization=q, overwrite=True)
        export_s = time.perf_counter() - t
        report = json.loads(path.with_suffix(".json").read_text())
        answers, answer_s = llama_cpp_answers(path, prompts)
        score = score_predictions(test, answers)["overall"]
        same = sum(a.strip() == b.strip() for a, b in zip(answers, reference, strict=True))
        check = report["verification"]
        rows.append({"quantization": q, "size_mb": report["size_bytes"] / 1e6, "export_s": export_s,
                     "llama_cpp_exact_match": score.accuracy, "points_vs_merged": 100 * (score.accuracy
                                                                                         - ref_score.accuracy),
                     "answers_identical_to_merged": same / len(test), "llama_cpp_answer_s": answer_s,
                     "logit_relative_rms_diff": check["relative_rms_diff"],
                     "logit_max_abs_diff": check["max_abs_logit_diff"], "top1_agreement": check["top1_agreement"],
                     "tensor_types": report["tensor_types"]})
        print(json.dumps(rows[-1]))
    result = {"machine": machine(), "held_out_tasks": len(test), "merged_dir": str(merged),
              "merged_exact_match_transformers": ref_score.accuracy, "merged_answer_s": ref_s,
              "llama_cpp_python": __import__("llama_cpp").__version__, "llama_cpp_python_build_s": args.build_s,
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_export.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "gguf_export.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["quantization"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, [100 * r["llama_cpp_exact_match"] for r in rows], color="tab:blue", label="llama.cpp")
    left.axhline(100 * result["merged_exact_match_transformers"], color="tab:red", ls="--",
                 label="merged model (transformers)")
    left.set_title(f"exact match on {result['held_out_tasks']} held-out demo tasks, %")
    left.legend(loc="lower left")
    right.bar(names, [r["size_mb"] for r in rows], color="tab:gray")
    right.set_title("GGUF file size, MB")
    fig.suptitle(f"demo model (SmolLM2-135M + LoRA) as GGUF; {result['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
