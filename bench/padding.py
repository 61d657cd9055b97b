"""Share of pad tokens in training batches: lrft's length grouping vs plain dynamic vs max length.

For SST-2 and RTE (full GLUE train splits, MiniLM's tokenizer, max_length 128, batch 32):
  grouped   lrft's default: dynamic padding + LengthGroupedSampler (data.group_by_length: true)
  dynamic   dynamic padding, random order (data.group_by_length: false)
  max_len   every row padded to max_length (run_glue.py's default)
One epoch of each loader is counted with `lrft.data.padding_fraction`; grouped and dynamic are
averaged over 3 seeds. Also the dev sets' eval batches (batch 64): dataset order (lrft before
the eval-order fix) vs longest-first (after). No timing, so machine load does not matter.

Run:  python bench/padding.py
"""

from __future__ import annotations

import sys

from _common import GLUE, MINILM, loadavg, table, write_result

TASKS = ("sst2", "rte")
BATCH, EVAL_BATCH, MAX_LEN, SEEDS = 32, 64, 128, (0, 1, 2)
TARGET = 0.05


def main() -> None:
    from lrft.data import load_classification_data, make_dataloader, padding_fraction, \
        tokenize_classification
    from lrft.models import load_tokenizer
    from lrft.recipe import DataConfig, ModelConfig

    tok = load_tokenizer(ModelConfig(name_or_path=MINILM))
    rows, out = [], {}
    for task in TASKS:
        raw = load_classification_data(DataConfig(glue_task=task, path=str(GLUE),
                                                  max_length=MAX_LEN), seed=0)
        data = tokenize_classification(raw, tok, MAX_LEN)
        train, dev = data.train, data.evals["validation"]

        def frac(ds, batch, **kw):
            return padding_fraction(make_dataloader(ds, tok, batch, **kw))

        grouped = [frac(train, BATCH, shuffle=True, seed=s, group_by_length=True) for s in SEEDS]
        dynamic = [frac(train, BATCH, shuffle=True, seed=s, group_by_length=False) for s in SEEDS]
        lengths = [len(x) for x in train["input_ids"]]
        max_len = 1 - sum(lengths) / (len(lengths) * MAX_LEN)
        eval_before = frac(dev, EVAL_BATCH, shuffle=False, seed=0, group_by_length=False)
        eval_after = frac(dev, EVAL_BATCH, shuffle=False, seed=0, group_by_length=True)
        r = {"task": task, "train rows": len(train), "mean len": sum(lengths) / len(lengths),
             "max_len": max_len, "dynamic": sum(dynamic) / len(dynamic),
             "grouped (lrft)": sum(grouped) / len(grouped),
             "eval before": eval_before, "eval after": eval_after,
             "pass": sum(grouped) / len(grouped) <= TARGET}
        rows.append(r)
        out[task] = {**r, "grouped_per_seed": grouped, "dynamic_per_seed": dynamic,
                     "dev_rows": len(dev)}
    print(table(rows))
    print(f"\ntarget: grouped <= {TARGET}; eval before/after: the dev set in dataset order vs "
          f"sorted longest-first (batch {EVAL_BATCH}); load {loadavg()}")
    write_result("padding", {"config": {"batch": BATCH, "eval_batch": EVAL_BATCH,
                                        "max_length": MAX_LEN, "seeds": list(SEEDS),
                                        "tokenizer": "all-MiniLM-L6-v2 (BERT uncased wordpiece)"},
                             "tasks": out, "target": {"grouped <=": TARGET,
                                                      "pass": all(r["pass"] for r in rows)}})


if __name__ == "__main__":
    sys.exit(main())
