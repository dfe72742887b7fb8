"""Merge a finetune() output folder into its base, try the result, and push it to the Hugging Face Hub.

    python examples/merge_and_push.py lora-alpaca merged                         # merge + one answer
    python examples/merge_and_push.py lora-alpaca merged --repo me/my-model --dry-run   # list the upload
    HF_TOKEN=hf_... python examples/merge_and_push.py lora-alpaca merged --repo me/my-model

Everything the merge needs comes from the adapter folder (base model, template, LoRA settings); the
merged folder is an ordinary transformers model (safetensors only) with a model card and a
merge_report.json that records the merged-vs-unmerged logit check.
"""

from __future__ import annotations

import argparse
import json
import logging

from alpaca_lora import merge, push_to_hub
from alpaca_lora.inference.generate import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="output folder of finetune()")
    parser.add_argument("output_dir", help="where the merged model goes (new or empty folder)")
    parser.add_argument("--base-model", help="base to merge into (default: the one recorded in adapter_dir)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--merge-into", default="original", choices=["original", "dequantized"])
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--prompt", default="Name three primary colors.", help="instruction to try the model on")
    parser.add_argument("--repo", help="Hub repo id to push to, e.g. me/my-model")
    parser.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be pushed, no upload")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out = merge(args.adapter_dir, args.output_dir, base_model=args.base_model, dtype=args.dtype,
                merge_into=args.merge_into, max_shard_size=args.max_shard_size)
    check = json.loads((out / "merge_report.json").read_text())["verification"]
    print(f"merged into {out}: max |merged - unmerged| logit = {check['max_abs_logit_diff']:.2e}, "
          f"adapter effect {check['adapter_effect_max_abs_logit_diff']:.3g}")
    print(f"{args.prompt}\n-> {generate(out, args.prompt, max_new_tokens=64)}")

    if args.repo:
        files = push_to_hub(out, args.repo, private=not args.public, dry_run=args.dry_run)
        print(("would upload" if args.dry_run else f"uploaded to {args.repo}:"), ", ".join(files))


if __name__ == "__main__":
    main()
