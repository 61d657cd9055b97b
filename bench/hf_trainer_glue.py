"""The SST-2 fine-tune of bench/recipes/sst2-minilm.yaml, run with transformers.Trainer.

Two set-ups, as bench/vs_trainer.py compares them:
  default  what examples/pytorch/text-classification/run_glue.py does with its defaults:
           tokenise padded to max_length 128, default_data_collator, random sampling,
           per_device_eval_batch_size 8.
  tuned    what a careful user does: no padding at tokenisation, DataCollatorWithPadding,
           train_sampling_strategy="group_by_length", eval batch 64 (lrft's default).
  --bf16   adds bf16=True (torch autocast, on a GPU or a CPU); the Trainer keeps the model's
           default SDPA attention.

Run:  python bench/hf_trainer_glue.py --setup tuned --seed 42 --rows 4000 --threads 1 \
          --glue ../shared/glue --model PATH --out runs/x   [--device cuda --bf16]
Prints one JSON line (prefixed RESULT) with wall, train and eval times and dev accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import time

T0 = time.perf_counter()  # wall time counts imports, as the lrft side's does

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--setup", choices=["default", "tuned"], required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--glue", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 mixed precision (GPU, or a CPU with AMX bf16 units)")
    a = p.parse_args()

    import datasets
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments,
                              default_data_collator, set_seed)

    torch.set_num_threads(a.threads)
    set_seed(a.seed)
    raw = datasets.load_dataset(a.glue, "sst2")
    # The same rows lrft's data.max_train_samples picks: a seeded shuffle, then the first n.
    train = raw["train"].shuffle(seed=a.seed).select(range(a.rows))
    dev = raw["validation"]
    tok = AutoTokenizer.from_pretrained(a.model)
    tuned = a.setup == "tuned"

    def encode(batch):
        kw = {} if tuned else {"padding": "max_length"}
        return tok(batch["sentence"], truncation=True, max_length=128, **kw)

    train = train.map(encode, batched=True, remove_columns=["sentence", "idx"])
    dev = dev.map(encode, batched=True, remove_columns=["sentence", "idx"])
    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=2)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    args = TrainingArguments(
        output_dir=a.out, seed=a.seed, num_train_epochs=1,
        per_device_train_batch_size=32, per_device_eval_batch_size=64 if tuned else 8,
        learning_rate=5e-5, weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=0,
        max_grad_norm=1.0, use_cpu=a.device == "cpu", bf16=a.bf16, report_to="none",
        save_strategy="no",
        eval_strategy="no", dataloader_pin_memory=False,
        train_sampling_strategy="group_by_length" if tuned else "random",
    )
    collator = DataCollatorWithPadding(tok) if tuned else default_data_collator
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=collator, processing_class=tok, compute_metrics=accuracy)
    t = time.perf_counter()
    trained = trainer.train()
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    metrics = trainer.evaluate()
    eval_s = time.perf_counter() - t
    trainer.save_model()  # run_glue.py saves the final model too
    print("RESULT " + json.dumps({
        "wall_s": time.perf_counter() - T0, "train_s": train_s, "eval_s": eval_s,
        "train_samples_per_s": trained.metrics["train_samples_per_second"],
        "accuracy": metrics["eval_accuracy"], "eval_loss": metrics["eval_loss"],
        "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
