"""Fine-tune your own Llama-family model on your own Alpaca-format data, on one 24 GB GPU.

Usage:
    python examples/finetune_alpaca.py --base_model /models/Llama-2-7b-hf --data my_data.json --output_dir lora-7b

Settings for a 7B-class model (Llama 2/3, Mistral) on a 24 GB GPU (RTX 3090/4090, A10):
- 4-bit NF4 base with double quantization (~3.9 GB of weights for 7B), bf16 compute on Ampere+;
- LoRA r 16, alpha 32, dropout 0.05 on q,k,v,o (add --all_linear for the MLP too: more capacity,
  ~2.5x the LoRA parameters, a little more memory);
- micro-batch 4 x cutoff 512 with gradient checkpointing fits with room to spare; a global batch of
  32 by gradient accumulation; 3 epochs at 3e-4 (1-2e-4 for 13B);
- 13B fits the same way at micro-batch 2; 8B (Llama 3, 128k vocabulary) at micro-batch 4 thanks to
  the label-only chunked loss, which never builds full (batch, length, vocabulary) logits.
"""

from __future__ import annotations

import argparse

from alpaca_lora import FinetuneConfig, finetune, generate, merge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", required=True, help="local model folder or cached Hub id")
    parser.add_argument("--data", required=True, help="Alpaca-format .json/.jsonl/.csv/.parquet")
    parser.add_argument("--output_dir", default="lora-alpaca")
    parser.add_argument("--all_linear", action="store_true", help="LoRA on every linear layer, not only attention")
    parser.add_argument("--merge_to", help="also merge the adapter into fp16 weights in this folder")
    args = parser.parse_args()

    config = FinetuneConfig(
        batch_size=32,
        micro_batch_size=4,
        num_epochs=3,
        learning_rate=3e-4,
        cutoff_len=512,
        val_set_size=0.02,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        lora_target_modules="all-linear" if args.all_linear else "attention",
        quantization="nf4",
        compute_dtype="auto",
        gradient_checkpointing=True,
        group_by_length=True,
        save_steps=200,
    )
    result = finetune(args.base_model, args.data, args.output_dir, config=config)
    print(f"train loss {result.train_loss:.4f}, eval loss {result.eval_loss}, {result.steps} steps, "
          f"{result.tokens_seen} tokens in {result.runtime_s / 60:.1f} min -> {result.adapter_dir}")
    print(generate(result.adapter_dir, "Tell me about alpacas."))
    if args.merge_to:
        print("merged model:", merge(result.adapter_dir, args.merge_to, dtype="float16"))


if __name__ == "__main__":
    main()
