"""Muon and schedule-free AdamW next to AdamW on MiniLM: training-step time and optimizer state.

Each optimizer is built the way a run builds it (`lrft.groups.param_groups`, weight decay 0.01,
`hidden_matrices` for Muon, then `lrft.optim.build_optimizer`) over its own copy of MiniLM
(all-MiniLM-L6-v2 with a 2-label head, 22.7M parameters). Two timings, rotating the order of the
optimizers from repeat to repeat so that the machine's load falls on all of them alike:

  train step      forward + backward + optimizer.step() + zero_grad on one fixed batch
                  (--batch x --tokens random token ids), under bf16 autocast as lrft's
                  `mixed_precision: auto` trains on this CPU (--mixed_precision no for fp32)
  optimizer step  optimizer.step() alone, on fixed random gradients

Reported per optimizer: medians, the median of the per-repeat ratios to AdamW (paired: the same
repeat, the same load), optimizer-state bytes (`lrft.optim.optimizer_state_bytes`) and bytes per
trainable parameter, and the 1-minute load average at every repeat.

Run:  python bench/muon_schedule_free.py [--repeats 8 --steps 3 --threads 1]
      (writes bench/results/muon_schedule_free.json; with --mixed_precision no, _fp32.json)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

from _common import MINILM, iqr, loadavg, median, table, write_result

OPTIMIZERS = ("adamw", "muon", "schedule_free_adamw")


def build(base, name: str):
    import torch

    from lrft.groups import param_groups
    from lrft.optim import OPTIMIZERS as SPECS
    from lrft.optim import build_optimizer

    model = copy.deepcopy(base)
    groups = param_groups(model, 5e-5, 0.01, hidden_matrices=SPECS[name].hidden_matrices)
    optimizer = build_optimizer(groups, name, lr=5e-5, weight_decay=0.01, model=model)
    g = torch.Generator().manual_seed(0)
    grads = {p: torch.randn(p.shape, generator=g) * 1e-3 for p in model.parameters()}
    return model, optimizer, grads


def train_step(model, optimizer, batch, autocast) -> float:
    t = time.perf_counter()
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def optimizer_step(model, optimizer, grads) -> float:
    for p in model.parameters():
        p.grad = grads[p].clone()
    t = time.perf_counter()
    optimizer.step()
    elapsed = time.perf_counter() - t
    optimizer.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--steps", type=int, default=3, help="timed train steps per optimizer per "
                                                         "repeat")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mixed_precision", choices=("bf16", "no"), default="bf16")
    a = p.parse_args()
    import torch
    from transformers import AutoModelForSequenceClassification

    from lrft.optim import optimizer_state_bytes
    from lrft.recipe import resolve_path

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_path(MINILM), num_labels=2)
    base.train()
    n_params = sum(p.numel() for p in base.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1000, 20000, (a.batch, a.tokens), generator=g),
             "attention_mask": torch.ones(a.batch, a.tokens, dtype=torch.long),
             "labels": torch.randint(0, 2, (a.batch,), generator=g)}

    def autocast():
        if a.mixed_precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    runs = {name: build(base, name) for name in OPTIMIZERS}
    for name, (model, optimizer, _) in runs.items():  # warm-up; creates the state
        train_step(model, optimizer, batch, autocast)
    state = {name: optimizer_state_bytes(o) for name, (_, o, _) in runs.items()}
    train_times = {name: [] for name in OPTIMIZERS}
    opt_times = {name: [] for name in OPTIMIZERS}
    paired = {name: {"train": [], "optimizer": []} for name in OPTIMIZERS}
    loads = []
    for r in range(a.repeats):
        order = OPTIMIZERS[r % len(OPTIMIZERS):] + OPTIMIZERS[:r % len(OPTIMIZERS)]
        this = {name: {} for name in OPTIMIZERS}
        for name in order:
            model, optimizer, grads = runs[name]
            steps = [train_step(model, optimizer, batch, autocast) for _ in range(a.steps)]
            opts = [optimizer_step(model, optimizer, grads) for _ in range(a.steps)]
            train_times[name] += steps
            opt_times[name] += opts
            this[name] = {"train": median(steps), "optimizer": median(opts)}
        for name in OPTIMIZERS:
            for kind in ("train", "optimizer"):
                paired[name][kind].append(this[name][kind] / this["adamw"][kind])
        loads.append(loadavg()[0])
        print(f"repeat {r + 1}/{a.repeats}: order {', '.join(order)}; load {loads[-1]}",
              flush=True)
    rows = []
    for name in OPTIMIZERS:
        rows.append({
            "optimizer": name, "train step ms": median(train_times[name]) * 1000,
            "train IQR ms": [x * 1000 for x in iqr(train_times[name])],
            "train / adamw": median(paired[name]["train"]),
            "optimizer step ms": median(opt_times[name]) * 1000,
            "optimizer / adamw": median(paired[name]["optimizer"]),
            "state MiB": state[name] / 2**20, "state / adamw": state[name] / state["adamw"],
            "state bytes/param": state[name] / n_params,
            "train_step_times_s": train_times[name], "optimizer_step_times_s": opt_times[name],
            "paired_train_ratios": paired[name]["train"],
            "paired_optimizer_ratios": paired[name]["optimizer"], "state bytes": state[name]})
    print()
    print(table(rows, ["optimizer", "train step ms", "train / adamw", "optimizer step ms",
                       "optimizer / adamw", "state MiB", "state / adamw", "state bytes/param"]))
    print(f"\nMiniLM {n_params:,} trainable parameters; batch {a.batch} x {a.tokens} tokens; "
          f"{a.mixed_precision}; threads {a.threads}; {a.repeats} repeats x {a.steps} steps; "
          f"1-min load during: {min(loads)}..{max(loads)}")
    name = "muon_schedule_free" + ("_fp32" if a.mixed_precision == "no" else "")
    write_result(name, {
        "config": {"threads": a.threads, "repeats": a.repeats, "steps": a.steps,
                   "batch": a.batch, "tokens": a.tokens, "mixed_precision": a.mixed_precision,
                   "weight_decay": 0.01, "lr": 5e-5, "params": n_params},
        "rows": rows, "loadavg_1min_during": loads})


if __name__ == "__main__":
    main()
