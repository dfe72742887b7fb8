"""Data preparation at scale: records/s and peak memory for 10k, 100k and 1M records, ours against the reference.

Each measurement runs in a fresh Python process on a generated JSONL file of real-shaped Alpaca records
(the GSM8K, GPTeacher roleplay and toolformer records of ``../shared/data``, taken in turn, each with its
number appended so no two are equal), with SmolLM2's tokenizer and cutoff 512:

- ``ours``: ``load_data`` (streamed into Arrow) and the tokenized-data cache (``cached_table``: batched
  fast-tokenizer calls in ``datasets.map``, worker processes from 20,000 records), then the report and
  the trainable rows, as ``finetune`` does; the caches start empty;
- ``ours_cached``: the same again in a new process: both caches are reused;
- ``reference``: the field's usual way, in one process: ``datasets.load_dataset("json")`` and a batched
  ``map`` that tokenizes the prompt and the full text with the fast tokenizer and masks the prompt's
  length, its Arrow cache on disk.

Memory: a thread samples ``/proc/self/status`` every 20 ms; ``peak_rss_mb`` is the highest resident set
above the process's baseline (after the imports), ``peak_anon_mb`` its anonymous part (the rest is pages
of memory-mapped Arrow files, which the kernel may drop), and ``workers_peak_rss_mb`` the largest resident
set of any worker process (``getrusage(RUSAGE_CHILDREN)``, absolute).

Usage::

    python benchmarks/data_scale.py --sizes 10000 100000 1000000 --out benchmarks/results/data_scale.json
    python benchmarks/data_scale.py --worker KIND DATA CACHE   # one measurement (what the driver runs)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SOURCES = ("gsm8k_train_alpaca.json", "gpteacher_roleplay_alpaca.json", "gpteacher_toolformer_alpaca.json")
CUTOFF = 512
MB = 1024**2


def write_records(path: Path, n: int) -> None:
    """``n`` real-shaped records as JSONL, the three shared sets in turn."""
    pools = [json.loads((SHARED / name).read_text(encoding="utf-8")) for name in SOURCES]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            pool = pools[i % len(pools)]
            r = pool[(i // len(pools)) % len(pool)]
            f.write(json.dumps({"instruction": f"{r['instruction']} ({i})", "input": r["input"],
                                "output": r["output"]}) + "\n")


class Sampler:
    """Peak resident and anonymous memory of this process, sampled every 20 ms."""

    def __init__(self) -> None:
        self.base_rss, self.base_anon = self._read()
        self.peak_rss, self.peak_anon = self.base_rss, self.base_anon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            rss, anon = self._read()
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        rss, anon = self._read()
        self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
        return {"peak_rss_mb": round((self.peak_rss - self.base_rss) / MB, 1),
                "peak_anon_mb": round((self.peak_anon - self.base_anon) / MB, 1),
                "baseline_rss_mb": round(self.base_rss / MB, 1)}


def run_ours(data: Path, cache: Path, tokenizer) -> dict:
    from alpaca_lora.data.pipeline import alpaca_spec, finish
    from alpaca_lora.data.sources import load_data, records_key
    from alpaca_lora.data.token_cache import cached_table

    records, _ = load_data(data, cache_dir=cache / "records")
    spec = alpaca_spec("alpaca", CUTOFF, False, True)
    table, hit = cached_table(records, tokenizer, spec, records_key=records_key(records), cache_dir=cache / "tok")
    train, report = finish(table, spec)
    return {"records": len(records), "kept": report.kept, "tokens": report.total_tokens, "cache_hit": hit}


def run_reference(data: Path, cache: Path, tokenizer) -> dict:
    import datasets

    from alpaca_lora.data.prompts import get_template

    template = get_template("alpaca")
    eos = tokenizer.eos_token

    def tokenize(batch):
        prompts = [template.render(i, x or None) for i, x in zip(batch["instruction"], batch["input"], strict=True)]
        full = [p + o + eos for p, o in zip(prompts, batch["output"], strict=True)]
        prompt_ids = tokenizer(prompts)["input_ids"]
        out = tokenizer(full, truncation=True, max_length=CUTOFF)
        out["labels"] = [[-100] * min(len(p), len(ids)) + ids[len(p):]
                         for p, ids in zip(prompt_ids, out["input_ids"], strict=True)]
        return out

    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache / "hf"))
    tokenized = ds.map(tokenize, batched=True, remove_columns=ds.column_names,
                       cache_file_name=str(cache / "reference.arrow"))
    return {"records": len(ds), "tokens": int(sum(len(x) for x in tokenized.with_format("numpy")["input_ids"]))}


def worker(kind: str, data: Path, cache: Path) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import datasets  # noqa: F401  (imported before the baseline, as by any user of the library)
    from transformers import AutoTokenizer

    import alpaca_lora.data.pipeline  # noqa: F401
    from alpaca_lora.model.embedded import default_base_model

    tokenizer = AutoTokenizer.from_pretrained(default_base_model())
    sampler = Sampler()
    start = time.perf_counter()
    out = run_reference(data, cache, tokenizer) if kind == "reference" else run_ours(data, cache, tokenizer)
    seconds = time.perf_counter() - start
    memory = sampler.stop()
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / MB
    print(json.dumps({"kind": kind, **out, "seconds": round(seconds, 2),
                      "records_per_s": round(out["records"] / seconds, 1), **memory,
                      "workers_peak_rss_mb": round(workers, 1)}))


def measure(kind: str, data: Path, cache: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, str(data), str(cache)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    if proc.returncode:
        raise RuntimeError(f"{kind} on {data} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": cpu, "cores": os.cpu_count(), "amx": "amx_tile" in flags, "python": platform.python_version(),
            "platform": platform.platform()}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in ("ours", "ours_cached", "reference"):
        rows = [r for r in results if r["kind"] == kind]
        sizes = [r["records"] for r in rows]
        left.plot(sizes, [r["records_per_s"] for r in rows], marker="o", label=kind)
        right.plot(sizes, [r["peak_rss_mb"] for r in rows], marker="o", label=kind)
    for ax, title in ((left, "records/s (higher is better)"), (right, "peak RSS above baseline, MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("records")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_scale.json"))
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "DATA", "CACHE"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            data = Path(tmp) / f"records-{n}.jsonl"
            write_records(data, n)
            for kind in ("ours", "ours_cached", "reference"):
                cache = Path(tmp) / f"cache-{n}"
                if kind == "reference":
                    cache = Path(tmp) / f"ref-{n}"
                row = measure("ours" if kind == "ours_cached" else kind, data, cache)
                row["kind"] = kind
                results.append(row)
                print(json.dumps(row), flush=True)
            shutil.rmtree(Path(tmp) / f"cache-{n}", ignore_errors=True)
            shutil.rmtree(Path(tmp) / f"ref-{n}", ignore_errors=True)
            data.unlink()
    by = {(r["kind"], r["records"]): r for r in results}
    summary = [{"records": n, "ours_s": by[("ours", n)]["seconds"], "cached_s": by[("ours_cached", n)]["seconds"],
                "reference_s": by[("reference", n)]["seconds"],
                "speed_vs_reference": round(by[("reference", n)]["seconds"] / by[("ours", n)]["seconds"], 2),
                "cached_share_of_first": round(by[("ours_cached", n)]["seconds"] / by[("ours", n)]["seconds"], 4),
                "ours_peak_rss_mb": by[("ours", n)]["peak_rss_mb"],
                "reference_peak_rss_mb": by[("reference", n)]["peak_rss_mb"]} for n in args.sizes]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "cutoff_len": CUTOFF, "summary": summary, "runs": results},
                              indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
