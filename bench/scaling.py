"""How lrft's throughput scales: processes, threads, sequence length and batch size (CPU, MiniLM).

Part 1, processes (each a real run of lrft/train.py on bench/recipes/sst2-minilm.yaml, --rows
SST-2 rows, per-device batch 32, evaluation cut to 64 rows; samples/s is lrft's own
`samples_per_s`, the training loop only, all processes counted):
  1 proc x 1 thread   python lrft/train.py ... train.num_threads=1
  1 proc x 2 threads  python lrft/train.py ... train.num_threads=2
  2 procs x 1 thread  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2
                      lrft/train.py ... train.num_threads=1   (gloo data parallel)
run round-robin --repeats times. The machine has 2 cores that other people's jobs share: this part
is noisy, and 2 threads or 2 processes only pay when both cores are free.

Part 2, one process (--threads): median time of one full training step (forward, backward, clip,
lrft's AdamW step, zero_grad) of MiniLM on random tokens of a fixed length (no padding), for sequence
lengths 32/64/128/256 at batch 32 and batch sizes 8/16/32/64 at length 128, in fp32 and, where the
hardware has bf16 units, as `train.mixed_precision: auto` runs it (bf16 autocast, with the attention
kernel lrft.precision picks for the length), round-robin over the cases --repeats times after one
warm-up step each.

Run:  python bench/scaling.py [--rows 480 --repeats 2 --threads 1]
      python bench/scaling.py --skip-processes   (part 2 only; part 1 kept from the last run)
      python bench/scaling.py --skip-processes --device cuda   (part 2 on a GPU machine)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import GLUE, MINILM, REPO, RESULTS, loadavg, median, table, write_result

SEQ_LENS, BATCHES = (32, 64, 128, 256), (8, 16, 32, 64)


def processes(rows: int, repeats: int, workdir: Path) -> list[dict]:
    base = ["lrft/train.py", "bench/recipes/sst2-minilm.yaml", f"data.path={GLUE}",
            f"data.max_train_samples={rows}", "data.max_eval_samples=64"]
    configs = {
        "1 proc x 1 thread": ([sys.executable], 1, {}),
        "1 proc x 2 threads": ([sys.executable], 2, {}),
        "2 procs x 1 thread": ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                "--num_processes", "2"], 1, {"ACCELERATE_USE_CPU": "1"}),
    }
    runs = []
    names = list(configs)
    for r in range(repeats):
        for name in names[r % 3:] + names[:r % 3]:
            launcher, threads, env = configs[name]
            out = workdir / f"{name.replace(' ', '')}-{r}"
            cmd = [*launcher, *base, f"train.num_threads={threads}", f"train.output_dir={out}"]
            load = loadavg()[0]
            t = time.perf_counter()
            with open(f"{out}.log", "w") as f:
                rc = subprocess.call(cmd, cwd=REPO, env={**os.environ, **env}, stdout=f,
                                     stderr=subprocess.STDOUT)
            if rc:
                raise SystemExit(f"{name} failed ({rc}); see {out}.log")
            res = json.loads((out / "results.json").read_text())
            runs.append({"config": name, "samples_per_s": res["samples_per_s"],
                         "train_s": res["train_time_s"], "wall_s": time.perf_counter() - t,
                         "loadavg": load})
            print(f"{name}: {res['samples_per_s']:.1f} samples/s (load {load})", flush=True)
    return runs


def shapes(threads: int, repeats: int, device: str) -> list[dict]:
    """Part 2: step time per shape, in fp32 and as lrft's `mixed_precision: auto` runs it."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lrft.groups import param_groups
    from lrft.optim import build_optimizer
    from lrft.precision import attention_for, native_bf16
    from lrft.recipe import resolve_path

    torch.set_num_threads(threads)
    dev = torch.device(device)
    # "auto": bf16 autocast where the hardware has bf16 units, with the attention lrft then loads
    # for each length (so one model per attention kernel used)
    precisions = {"fp32": False, **({"auto (bf16)": True} if native_bf16(dev) else {})}
    attn = {(name, s): attention_for(None, dev, "bf16" if bf16 else "no", s)[0] or "sdpa"
            for name, bf16 in precisions.items() for s in SEQ_LENS}
    models, opts = {}, {}
    for key in {(name, impl) for (name, _), impl in attn.items()}:
        m = AutoModelForSequenceClassification.from_pretrained(
            resolve_path(MINILM), num_labels=2, attn_implementation=key[1]).to(dev).train()
        models[key] = m
        opts[key] = build_optimizer(param_groups(m, 5e-5, 0.01), "adamw", lr=5e-5,
                                    weight_decay=0.01)
    grid = [(32, s) for s in SEQ_LENS] + [(b, 128) for b in BATCHES if b != 32]
    g = torch.Generator().manual_seed(0)
    data = {(b, s): {"input_ids": torch.randint(1000, 30000, (b, s), generator=g),
                     "attention_mask": torch.ones(b, s, dtype=torch.long),
                     "labels": torch.randint(0, 2, (b,), generator=g)} for b, s in grid}
    data = {k: {n: x.to(dev) for n, x in v.items()} for k, v in data.items()}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(name: str, shape: tuple[int, int]) -> float:
        key = (name, attn[name, shape[1]])
        model, opt = models[key], opts[key]
        sync()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precisions[name]):
            loss = model(**data[shape]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sync()
        return time.perf_counter() - t

    cases = [(name, shape) for shape in grid for name in precisions]
    for case in cases:
        step(*case)  # warm-up
    times = {case: [] for case in cases}
    for r in range(repeats):
        for case in cases[r % len(cases):] + cases[:r % len(cases)]:
            times[case].append(step(*case))
        print(f"shapes rotation {r + 1}: load {loadavg()[0]}", flush=True)
    rows = []
    for (name, (b, s)), ts in times.items():
        m, ref = median(ts), median(times[name, (32, 128)])
        rows.append({"precision": name, "attention": attn[name, s], "batch": b,
                     "seq_len": s, "tokens": b * s, "step ms": m * 1000, "x vs 32x128": m / ref,
                     "samples/s": b / m, "tokens/s": b * s / m, "step_times_s": ts})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=480)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--shape-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-processes", action="store_true")
    p.add_argument("--device", default="cpu", help="part 2 on cpu, or cuda on a GPU machine")
    p.add_argument("--workdir", default="/tmp/lrft-bench/scaling")
    a = p.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / "scaling.json"
    if a.skip_processes and previous.exists():  # keep part 1 of the last full run
        runs = json.loads(previous.read_text()).get("process_runs", [])
    else:
        runs = [] if a.skip_processes else processes(a.rows, a.repeats, workdir)
    proc_rows = []
    for name in dict.fromkeys(r["config"] for r in runs):
        xs = [r["samples_per_s"] for r in runs if r["config"] == name]
        proc_rows.append({"config": name, "samples/s (median)": median(xs), "runs": len(xs)})
    if proc_rows:
        ref = proc_rows[0]["samples/s (median)"]
        for r in proc_rows:
            r["x vs 1x1"] = r["samples/s (median)"] / ref
        print()
        print(table(proc_rows))
    shape_rows = shapes(a.threads, a.shape_repeats, a.device)
    print()
    print(table(shape_rows, ["precision", "attention", "batch", "seq_len", "tokens", "step ms",
                             "x vs 32x128", "samples/s", "tokens/s"]))
    print(f"\nload {loadavg()}")
    write_result("scaling", {"config": {"rows": a.rows, "repeats": a.repeats, "threads": a.threads,
                                        "shape_repeats": a.shape_repeats, "per_device_batch": 32,
                                        "device": a.device},
                             "process_runs": runs, "processes": proc_rows, "shapes": shape_rows})


if __name__ == "__main__":
    main()
