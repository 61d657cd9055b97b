"""lrft's training step time / a bare Accelerate loop's, on the same model, batches and optimizer.

One process builds MiniLM, its param groups, AdamW and Accelerate through lrft's own `build_run`
(bench/recipes/sst2-minilm.yaml), takes a fixed list of SST-2 training batches from lrft's
loader (each cut or padded to --seq_len tokens, so all steps do equal work), then runs blocks of --steps optimizer steps over that list, rotating between:
  lrft       `lrft.train.train_loop`, the real loop: accumulate(), loss bookkeeping, tokens count,
             clip_grad_norm_ (recipe default max_grad_norm 1.0), guard hook (off), tqdm,
             metrics.jsonl every logging_steps (10), the LR scheduler
  bare+clip  the canonical Accelerate loop (model(**batch), accelerator.backward, optimizer.step,
             scheduler.step, zero_grad) plus accelerator.clip_grad_norm_(..., 1.0), the same
             arithmetic as lrft's default
  bare       the canonical loop exactly as in accelerate's nlp_example (no clipping)
The same model and optimizer are used by all three (their weights keep training; step time does
not depend on the values). A step's time is the interval between two consecutive batch requests,
so it covers everything the loop does per step. The first --warmup steps of every block are
dropped; the ratio is median(lrft step) / median(bare+clip step) over all blocks, and the same per
rotation (paired, same load moment). On a GPU the per-request intervals show host time only (the
host runs ahead of the device), so use `ratio_vs_bare_clip_block_means` there: each block's time
from its first timed step to a device sync after its last step, per step.

Run:  python bench/loop_overhead.py [--steps 12 --repeats 6 --threads 1]
      python bench/loop_overhead.py --tiny --steps 60   (the loop's own cost, in ms per step)
      accelerate launch --mixed_precision bf16 bench/loop_overhead.py --steps 100   (GPU)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import GLUE, MINILM, REPO, iqr, loadavg, median, table, write_result

TARGET = 1.03


class TimedBatches:
    """Yields a fixed list of batches, recording the time of every request."""

    def __init__(self, batches):
        self.batches, self.stamps = batches, []

    def __iter__(self):
        for b in self.batches:
            self.stamps.append(time.perf_counter())
            yield b

    def step_times(self, warmup: int) -> list[float]:
        d = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return d[warmup:]

    def mean_step(self, warmup: int, end: float) -> float:
        """Mean step time from the first timed step to `end` (taken after a device sync)."""
        return (end - self.stamps[warmup]) / (len(self.stamps) - warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per block")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of a block")
    p.add_argument("--repeats", type=int, default=6, help="rotations of the three loops")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=48, help="tokens per row in every batch")
    p.add_argument("--tiny", action="store_true",
                   help="a 2-layer, hidden-32 BERT with MiniLM's vocabulary instead of MiniLM: "
                        "steps of a few ms, so the loop's own per-step cost shows in ms")
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "auto"],
                   help="the same for all three loops; fp32 (no) by default: the steadiest step "
                        "on a CPU, and the loop's own host work does not depend on it")
    a = p.parse_args()

    import torch
    from transformers import get_scheduler

    from dataclasses import replace

    from lrft.checkpoint import RunState
    from lrft.recipe import load_recipe
    from lrft.runlog import MetricsLog
    from lrft.setup import build_run, build_schedule, make_accelerator
    from lrft.train import train_loop

    out = Path(tempfile.mkdtemp(prefix="lrft-loop-"))
    model_args = [f"model.name_or_path={_tiny_bert(out / 'tiny-bert')}"] if a.tiny else []
    n_batches = a.steps + 1  # the last request ends the last timed step
    recipe = load_recipe(REPO / "bench/recipes/sst2-minilm.yaml", [
        f"data.path={GLUE}", f"data.max_train_samples={n_batches * a.batch}",
        "data.max_eval_samples=16", f"train.per_device_train_batch_size={a.batch}",
        f"train.num_threads={a.threads}", f"train.output_dir={out / 'run'}",
        f"train.mixed_precision={a.mixed_precision}", *model_args])
    torch.set_num_threads(a.threads)
    accelerator, _ = make_accelerator(recipe)
    run = build_run(recipe, accelerator)
    model, optimizer = run.model, run.optimizer
    # Every batch cut or padded to --seq_len tokens, so every step does the same work and the
    # median step is a fair summary (SST-2 batches otherwise range from ~160 to ~800 tokens).
    batches = [_fixed_length(b, a.seq_len, run.tokenizer.pad_token_id)
               for b in list(run.train_loader)[:n_batches]]
    tokens = [int(b["attention_mask"].sum()) for b in batches]

    cuda = accelerator.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def lrft_block() -> TimedBatches:
        timed = TimedBatches(batches)
        schedule = build_schedule(replace(recipe, train=replace(recipe.train, max_steps=a.steps)),
                                  optimizer, a.steps)
        log = MetricsLog(out / "metrics.jsonl", True)
        sync()
        train_loop(replace(run, train_loader=timed, eval_loaders={}), schedule, RunState(), log)
        timed.end = _synced(sync)
        return timed

    def bare_block(clip: bool) -> TimedBatches:
        timed = TimedBatches(batches)
        sched = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=a.steps)
        model.train()
        sync()
        for i, batch in enumerate(timed):
            outputs = model(**batch)
            loss = outputs.loss
            accelerator.backward(loss)
            if clip:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            sched.step()
            optimizer.zero_grad()
            if i + 1 == a.steps:
                break
        timed.end = _synced(sync)
        return timed

    loops = {"lrft": lrft_block, "bare+clip": lambda: bare_block(True),
             "bare": lambda: bare_block(False)}
    names = list(loops)
    times = {k: [] for k in names}
    block_means = {k: [] for k in names}  # per block, device-synced: the figure for a GPU
    per_rep = []
    loads = []
    bare_block(True)  # warm-up: allocator, optimizer state, first-call costs
    for r in range(a.repeats):
        order = names[r % 3:] + names[:r % 3]
        loads.append(loadavg()[0])
        rep = {}
        for k in order:
            timed = loops[k]()
            rep[k] = timed.step_times(a.warmup)
            times[k] += rep[k]
            block_means[k].append(timed.mean_step(a.warmup, timed.end))
        per_rep.append({k: median(v) for k, v in rep.items()})
        print(f"rotation {r + 1}: " + "  ".join(f"{k} {median(v) * 1000:.0f} ms"
                                                for k, v in rep.items()) + f"  load {loads[-1]}",
              flush=True)

    rows = [{"loop": k, "median step ms": median(v) * 1000, "iqr ms": "%.0f..%.0f" % tuple(
        x * 1000 for x in iqr(v)), "steps timed": len(v),
        "ratio vs bare+clip": median(v) / median(times["bare+clip"]),
        "ratio vs bare": median(v) / median(times["bare"])} for k, v in times.items()]
    paired = [r["lrft"] / r["bare+clip"] for r in per_rep]
    paired_noclip = [r["lrft"] / r["bare"] for r in per_rep]
    ratio = median(times["lrft"]) / median(times["bare+clip"])
    print()
    print(table(rows))
    print(f"\nlrft / bare+clip: {ratio:.3f} (median of per-rotation ratios {median(paired):.3f}); "
          f"lrft / bare (no clip): {median(times['lrft']) / median(times['bare']):.3f}; "
          f"target <= {TARGET}; load {min(loads)}..{max(loads)}")
    name = "loop_overhead" + ("_tiny" if a.tiny else "") + \
        ("" if a.mixed_precision == "no" else f"_{a.mixed_precision}")
    write_result(name, {
        "config": {"model": "tiny BERT (2 layers, hidden 32)" if a.tiny else "all-MiniLM-L6-v2", "batch": a.batch, "seq_len": a.seq_len,
                   "steps_per_block": a.steps,
                   "warmup_dropped": a.warmup, "repeats": a.repeats, "threads": a.threads,
                   "tokens_per_batch": tokens[:a.steps], "device": str(accelerator.device),
                   "mixed_precision": accelerator.mixed_precision},
        "step_times_s": times, "per_rotation_median_s": per_rep, "summary": rows,
        "block_mean_step_s": block_means,
        "ratio_vs_bare_clip_block_means":
            median(block_means["lrft"]) / median(block_means["bare+clip"]),
        "loadavg_1min_during": loads,
        "ratio_vs_bare_clip": ratio, "ratio_vs_bare_clip_paired_median": median(paired),
        "ratio_vs_bare_noclip": median(times["lrft"]) / median(times["bare"]),
        "ratio_vs_bare_noclip_paired_median": median(paired_noclip),
        "target": {"lrft / bare+clip <=": TARGET, "measured": ratio, "pass": ratio <= TARGET}})


def _tiny_bert(folder: Path) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) saved with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lrft.recipe import resolve_path

    tok = AutoTokenizer.from_pretrained(resolve_path(MINILM))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _fixed_length(batch: dict, n: int, pad_id: int) -> dict:
    import torch.nn.functional as F

    out = {}
    for k, v in batch.items():
        if v.dim() == 2:
            v = v[:, :n]
            v = F.pad(v, (0, n - v.shape[1]), value=pad_id if k == "input_ids" else 0)
        out[k] = v
    return out


def _synced(sync) -> float:
    sync()
    return time.perf_counter()


if __name__ == "__main__":
    main()
