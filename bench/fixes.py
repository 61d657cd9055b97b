"""Before/after figures for the performance fixes made in lrft while benchmarking.

1. Eval batches in length order (lrft/train.py `build_run`): the dev loaders used dataset order;
   they now use lrft.data's longest-first order when data.group_by_length is on (the default).
   Measured in one process, alternating: `evaluate_model` over the full SST-2 dev set (872 rows,
   batch 64, MiniLM) with each order, --repeats times; pad share of the eval batches; accuracy
   (must be identical: the order does not change any prediction).
2. Host syncs per training step (lrft/train.py `train_loop`): the loop read the step's loss, grad norm
   and token count back to the host every step (`.item()`, `float()`, `int()`: three device
   syncs per step on a GPU, which stall the CUDA launch queue). They now stay on the device
   and are read at logging steps (and every step only when the divergence guard is on).
   Counted by wrapping torch.Tensor.item/__float__/__int__/__bool__ around `train_loop` for --steps
   steps (logging_steps 10), counting only calls made from lrft's own code (lrft/train.py,
   lrft/guard.py). A count, so CPU-only machines can measure it; what it buys on a GPU is not
   measurable here (see README). `--label before` stored the count of the old loop.
3. AdamW implementation (lrft/optim.py): lrft built torch.optim.AdamW with fused=None on CPU,
   i.e. torch's single-tensor path (one small op per parameter tensor; and on a GPU run, where
   the model is still on the CPU when the optimizer is built, foreach instead of fused). It now
   asks for the fused kernel, which torch has on CPU and CUDA (the HF Trainer's default,
   adamw_torch_fused). Measured in one process on MiniLM's param groups with fixed random
   gradients: median `optimizer.step()` time of the old construction vs lrft's build_optimizer,
   alternating, --repeats x 2 steps each after a warm-up step.
4. Lion implementation (lrft/optim.py): lion-pytorch's per-tensor `Lion` (about 5 ops per
   parameter tensor) replaced by its `lion_pytorch.foreach.Lion` (the same update, state and
   per-group weight decay, in multi-tensor ops). Measured like 3.
5. Mixed precision on a CPU with AMX (lrft/precision.py): runs trained in fp32 unless the recipe or
   the launcher asked for bf16. `train.mixed_precision: auto` (the default) now picks bf16
   autocast where the hardware has bf16 units, and on a CPU with sequences under 256 tokens loads
   the model with eager attention, because torch's SDPA flash kernel is slower in bf16 there.
   Measured in one process: median MiniLM training step (forward, backward, clip 1.0, fused
   AdamW; batch 32 of real SST-2 rows cut or padded to --seq_len tokens, padding costing the
   same as text) in fp32 +
   SDPA (before), bf16 + SDPA (what `mixed_precision: bf16` alone, or the Trainer's bf16=True,
   gets) and bf16 + eager (after), rotating, --repeats x 3 steps each after a warm-up step; and
   the attention kernel alone (forward + backward) at MiniLM's and a Llama's head shapes.

Run:  python bench/fixes.py [--label after] [--parts precision eval ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import GLUE, REPO, RESULTS, loadavg, median, table, train_step, write_result


def count_syncs(recipe, run, steps: int) -> float:
    import torch

    batches = list(run.train_loader)[:steps]
    counts = {"n": 0}
    saved = {}
    for name in ("item", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)
        saved[name] = orig

        def wrapped(self, *a, _orig=orig, **k):
            # Only the loop's own reads: torch's CPU-side step counters (Adam's .item() on its
            # CPU `step` tensors) and the model's internals are not the loop's doing.
            if sys._getframe(1).f_code.co_filename.endswith(("lrft/train.py", "lrft/guard.py")):
                counts["n"] += 1
            return _orig(self, *a, **k)

        setattr(torch.Tensor, name, wrapped)
    try:
        from dataclasses import replace

        from lrft.checkpoint import RunState
        from lrft.runlog import MetricsLog
        from lrft.setup import build_schedule
        from lrft.train import train_loop

        schedule = build_schedule(replace(recipe, train=replace(recipe.train, max_steps=steps)),
                                  run.optimizer, steps)
        out = Path(tempfile.mkdtemp(prefix="lrft-fix-"))
        # only the steps: no eval loaders, so the final evaluation reads nothing
        train_loop(replace(run, train_loader=batches, eval_loaders={}), schedule, RunState(),
                   MetricsLog(out / "m.jsonl", True))
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)
    return counts["n"] / steps


def eval_order(recipe, accelerator, run, repeats: int) -> dict:
    from lrft.data import make_dataloader, padding_fraction
    from lrft.evaluation import evaluate_model
    from lrft.setup import load_data

    dev = load_data(recipe, run.tokenizer).evals["validation"]
    loaders = {o: accelerator.prepare(make_dataloader(dev, run.tokenizer, 64, shuffle=False, seed=0,
                                                      group_by_length=(o == "after")))
               for o in ("before", "after")}
    times = {o: [] for o in loaders}
    metrics = {}
    evaluate_model(accelerator, run.model, {"validation": loaders["after"]}, run.task_info)
    for r in range(repeats):
        for o in (("before", "after") if r % 2 == 0 else ("after", "before")):
            t = time.perf_counter()
            metrics[o] = evaluate_model(accelerator, run.model, {"validation": loaders[o]},
                                        run.task_info)["validation"]
            times[o].append(time.perf_counter() - t)
        print(f"eval rotation {r + 1}: before {times['before'][-1]:.1f}s after "
              f"{times['after'][-1]:.1f}s load {loadavg()[0]}", flush=True)
    return {o: {"eval_s_median": median(times[o]), "eval_s": times[o],
                "pad_fraction": padding_fraction(loaders[o]), **metrics[o]} for o in loaders}


def adamw_step(run, repeats: int) -> dict:
    import torch

    from lrft.groups import param_groups
    from lrft.optim import build_optimizer

    model = run.model
    _random_grads(model)
    opts = {"before": torch.optim.AdamW(param_groups(model, 5e-5, 0.01), lr=5e-5, fused=None),
            "after": build_optimizer(param_groups(model, 5e-5, 0.01), "adamw", lr=5e-5,
                                     weight_decay=0.01)}
    return _step_times("AdamW", opts, repeats)


def lion_step(run, repeats: int) -> dict:
    from lion_pytorch import Lion

    from lrft.groups import param_groups
    from lrft.optim import build_optimizer

    model = run.model
    _random_grads(model)
    opts = {"before": Lion(param_groups(model, 5e-5, 0.01), lr=5e-5, weight_decay=0.01),
            "after": build_optimizer(param_groups(model, 5e-5, 0.01), "lion", lr=5e-5,
                                     weight_decay=0.01)}
    return _step_times("Lion", opts, repeats)


def precision_step(run, model_path: str, repeats: int, seq_lens: list[int]) -> dict:
    """Fix 5: MiniLM training step time in fp32 + SDPA, bf16 + SDPA and bf16 + eager."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lrft.precision import native_bf16
    from lrft.recipe import resolve_path

    path = resolve_path(model_path)
    settings = {"fp32+sdpa": ("sdpa", False), "bf16+sdpa": ("sdpa", True),
                "bf16+eager": ("eager", True)}
    models = {k: AutoModelForSequenceClassification.from_pretrained(path, num_labels=2,
                                                                    attn_implementation=attn)
              for k, (attn, _) in settings.items()}
    for m in models.values():
        m.load_state_dict(models["fp32+sdpa"].state_dict())
    opts = {k: torch.optim.AdamW(m.parameters(), lr=5e-5, fused=True) for k, m in models.items()}
    rows = next(iter(run.train_loader))
    out = {"native_bf16": native_bf16(torch.device("cpu"))}
    for seq_len in seq_lens:
        batch = _fixed_length(rows, seq_len)
        times = {k: [] for k in settings}

        def step(k, batch=batch):
            train_step(models[k], opts[k], batch, bf16=settings[k][1])

        for k in settings:
            step(k)
        order = list(settings)
        for r in range(repeats):
            for k in order[r % 3:] + order[:r % 3]:
                for _ in range(3):
                    t = time.perf_counter()
                    step(k)
                    times[k].append(time.perf_counter() - t)
        res = {k: {"step_s_median": median(v), "step_s": v} for k, v in times.items()}
        res["speedup"] = res["fp32+sdpa"]["step_s_median"] / res["bf16+eager"]["step_s_median"]
        out[f"seq_{seq_len}"] = res
        print(f"MiniLM step, batch 32 x {seq_len} tokens: " + ", ".join(
            f"{k} {res[k]['step_s_median']:.2f}s" for k in settings) +
            f" ({res['speedup']:.2f}x)", flush=True)
    out["attention_kernel"] = attention_kernel()
    return out


def _fixed_length(batch: dict, seq_len: int) -> dict:
    """The batch's rows cut or padded (with the pad id 0 and mask 0) to seq_len tokens."""
    import torch.nn.functional as F

    out = {}
    for k, v in batch.items():
        if v.dim() == 2:
            v = v[:, :seq_len] if v.shape[1] >= seq_len else F.pad(v, (0, seq_len - v.shape[1]))
        out[k] = v
    return out


def attention_kernel() -> list[dict]:
    """SDPA forward + backward, flash vs math kernel, fp32 and bf16, at a few head shapes."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for b, h, n, d in [(32, 12, 48, 32), (32, 12, 128, 32), (8, 12, 128, 64), (8, 9, 256, 64)]:
        for dtype in (torch.float32, torch.bfloat16):
            row = {"batch x heads x tokens x dim": f"{b}x{h}x{n}x{d}", "dtype": str(dtype)[6:]}
            for name, kernel in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
                q, k, v = (torch.randn(b, h, n, d, dtype=dtype, requires_grad=True)
                           for _ in range(3))
                mask = torch.zeros(b, 1, n, n, dtype=dtype)  # padded batches carry a mask
                with sdpa_kernel(kernel):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
                    ts = []
                    for _ in range(3):
                        t = time.perf_counter()
                        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
                        ts.append(time.perf_counter() - t)
                row[f"{name} ms"] = median(ts) * 1000
            rows.append(row)
    print(table(rows))
    return rows


def _random_grads(model) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.device) * 1e-3


def _step_times(name: str, opts: dict, repeats: int) -> dict:
    times = {k: [] for k in opts}
    for o in opts.values():
        o.step()
    for r in range(2 * repeats):
        for k in (("before", "after") if r % 2 == 0 else ("after", "before")):
            t = time.perf_counter()
            opts[k].step()
            times[k].append(time.perf_counter() - t)
    out = {k: {"step_ms_median": median(v) * 1000, "step_s": v,
               "class": f"{type(opts[k]).__module__}.{type(opts[k]).__name__}",
               "fused": opts[k].defaults.get("fused")} for k, v in times.items()}
    out["speedup"] = out["before"]["step_ms_median"] / out["after"]["step_ms_median"]
    print(f"{name} step: before {out['before']['step_ms_median']:.0f} ms, after "
          f"{out['after']['step_ms_median']:.0f} ms ({out['speedup']:.1f}x)")
    return out


PARTS = ("syncs", "eval", "adamw", "lion", "precision")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="after", choices=["before", "after"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--seq_lens", type=int, nargs="+", default=[48, 128],
                   help="sequence lengths for the precision part")
    a = p.parse_args()
    import torch

    from lrft.recipe import load_recipe
    from lrft.setup import build_run, make_accelerator

    torch.set_num_threads(a.threads)
    recipe = load_recipe(REPO / "bench/recipes/sst2-minilm.yaml", [
        f"data.path={GLUE}", f"data.max_train_samples={32 * a.steps}",
        f"train.num_threads={a.threads}", f"train.output_dir={tempfile.mkdtemp()}"])
    accelerator, _ = make_accelerator(recipe)
    run = build_run(recipe, accelerator)
    previous = RESULTS / "fixes.json"
    result = json.loads(previous.read_text()) if previous.exists() else {}
    result.pop("benchmark", None), result.pop("time", None), result.pop("machine", None)
    if "syncs" in a.parts:
        syncs = result.setdefault("host_syncs_per_step", {})
        syncs[a.label] = count_syncs(recipe, run, a.steps)
        syncs["steps_counted"] = a.steps
        syncs["logging_steps"] = recipe.train.logging_steps
        print(f"host syncs per step ({a.label}): {syncs[a.label]:.2f}")
    if "eval" in a.parts:
        result["eval_order"] = eval_order(recipe, accelerator, run, a.repeats)
        e = result["eval_order"]
        rows = [{"eval order": o, "eval s (median)": v["eval_s_median"], "pad share":
                 v["pad_fraction"], "accuracy": v["accuracy"]} for o, v in e.items()]
        print(table(rows))
        e["speedup"] = e["before"]["eval_s_median"] / e["after"]["eval_s_median"]
        e["mixed_precision"] = accelerator.mixed_precision
        print(f"eval speed-up {e['speedup']:.2f}x")
    if "adamw" in a.parts:
        result["adamw_step"] = adamw_step(run, a.repeats)
    if "lion" in a.parts:
        result["lion_step"] = lion_step(run, a.repeats)
    if "precision" in a.parts:
        result["precision_step"] = precision_step(run, recipe.model.name_or_path, a.repeats,
                                                  a.seq_lens)
    result["config"] = {"threads": a.threads, "eval_rows": 872, "eval_batch": 64,
                        "repeats": a.repeats}
    write_result("fixes", result)


if __name__ == "__main__":
    main()
