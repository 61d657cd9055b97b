"""lrft against transformers.Trainer: wall time of the same SST-2 fine-tune, and its accuracy.

The fine-tune (bench/recipes/sst2-minilm.yaml): MiniLM, N seeded SST-2 train rows, 1 epoch,
batch 32, AdamW lr 5e-5, linear decay, clip 1.0, evaluation on the full dev set (872 rows),
final model saved. Variants, each a fresh process through its real entry point:
  lrft        `python -m lrft.cli train bench/recipes/sst2-minilm.yaml ...`, lrft's defaults
              (train.mixed_precision: auto, i.e. bf16 autocast on a CPU with AMX or an Ampere+ GPU)
  lrft_fp32   the same with train.mixed_precision=no (lrft before `auto`; like for like with tuned)
  tuned       bench/hf_trainer_glue.py --setup tuned    (dynamic padding + group_by_length)
  default     bench/hf_trainer_glue.py --setup default  (run_glue.py: padded to max_length 128)
  tuned_bf16  tuned with bf16=True, which a user who knows the hardware has bf16 units would add
For each seed the variants run back to back, the order rotating from seed to seed; wall time is
measured by this script around the process (imports, data, model, train, eval, save). Every
side gets the same torch thread count (--threads). Ratios are per seed (same load moment), then
the median.

Run:  python bench/vs_trainer.py                     (4,000 rows x 3 seeds, 1 thread: ~55 min)
      python bench/vs_trainer.py --rows 2000 --variants lrft tuned     (quicker)
      python bench/vs_trainer.py --device cuda --bf16                  (on a GPU machine)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import GLUE, MINILM, REPO, iqr, loadavg, median, table, write_result

VARIANTS = ("lrft", "tuned", "default", "tuned_bf16", "lrft_fp32")


def run_lrft(rows: int, seed: int, threads: int, out: Path, device: str,
             precision: str | None) -> dict:
    cmd = [sys.executable, "-m", "lrft.cli", "train", "bench/recipes/sst2-minilm.yaml",
           f"data.path={GLUE}", f"data.max_train_samples={rows}", f"train.seed={seed}",
           f"train.num_threads={threads}", f"train.output_dir={out}"]
    if precision:
        cmd.append(f"train.mixed_precision={precision}")
    # Accelerate picks the GPU when there is one; ACCELERATE_USE_CPU=1 keeps a cpu run on it.
    wall = _timed(cmd, out.with_suffix(".log"),
                  env={"ACCELERATE_USE_CPU": "1"} if device == "cpu" else {})
    res = json.loads((out / "results.json").read_text())
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {"wall_s": wall, "train_s": res["train_time_s"], "accuracy": res["final"]["accuracy"],
            "train_samples_per_s": rows / res["train_time_s"],
            "mixed_precision": start["mixed_precision"]}


def run_trainer(setup: str, rows: int, seed: int, threads: int, out: Path, device: str,
                bf16: bool) -> dict:
    from lrft.recipe import resolve_path

    cmd = [sys.executable, "bench/hf_trainer_glue.py", "--setup", setup, "--seed", str(seed),
           "--rows", str(rows), "--threads", str(threads), "--glue", str(GLUE),
           "--model", resolve_path(MINILM), "--out", str(out), "--device", device]
    if bf16:
        cmd.append("--bf16")
    log = out.with_suffix(".log")
    wall = _timed(cmd, log)
    line = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    return {"wall_s": wall, "train_s": res["train_s"], "accuracy": res["accuracy"],
            "train_samples_per_s": rows / res["train_s"], "mixed_precision": "bf16" if bf16 else "no"}


def _timed(cmd: list[str], log: Path, env: dict | None = None) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--workdir", default="/tmp/lrft-bench/vs_trainer")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision on every side")
    a = p.parse_args()

    runs = []
    for i, seed in enumerate(a.seeds):
        order = a.variants[i % len(a.variants):] + a.variants[:i % len(a.variants)]
        for v in order:
            out = Path(a.workdir) / f"{v}-s{seed}"
            before = loadavg()
            if v.startswith("lrft"):
                precision = "no" if v == "lrft_fp32" else "bf16" if a.bf16 else None
                r = run_lrft(a.rows, seed, a.threads, out, a.device, precision)
            else:
                setup, bf16 = v.removesuffix("_bf16"), a.bf16 or v.endswith("_bf16")
                r = run_trainer(setup, a.rows, seed, a.threads, out, a.device, bf16)
            r.update(variant=v, seed=seed, loadavg=before)
            runs.append(r)
            print(f"seed {seed} {v:8s} wall {r['wall_s']:7.1f}s train {r['train_s']:7.1f}s "
                  f"acc {r['accuracy']:.4f} load {before[0]}", flush=True)
        summarise(a, runs, final=False)  # a partial result survives an interrupted run

    summarise(a, runs)


def summarise(a, runs: list[dict], final: bool = True) -> None:
    """Table, ratios (per seed that every variant finished) and the JSON result."""
    seeds = [s for s in a.seeds if all(any(r["seed"] == s and r["variant"] == v for r in runs)
                                       for v in a.variants)]
    if not seeds:
        return
    by = {v: {r["seed"]: r for r in runs if r["variant"] == v} for v in a.variants}
    rows = []
    for v in a.variants:
        rs = [by[v][s] for s in seeds]
        rows.append({"variant": v, "precision": "/".join(sorted({r["mixed_precision"] for r in rs})),
                     "wall_s (median)": median([r["wall_s"] for r in rs]),
                     "train_s (median)": median([r["train_s"] for r in rs]),
                     "train samples/s": median([r["train_samples_per_s"] for r in rs]),
                     "dev acc (mean)": sum(r["accuracy"] for r in rs) / len(rs),
                     "dev acc (min..max)": f"{min(r['accuracy'] for r in rs):.4f}.."
                                           f"{max(r['accuracy'] for r in rs):.4f}"})
    ratios = {}
    if "lrft" in by:
        for v in a.variants:
            if v == "lrft":
                continue
            per_seed = [by["lrft"][s]["wall_s"] / by[v][s]["wall_s"] for s in seeds]
            per_seed_train = [by["lrft"][s]["train_s"] / by[v][s]["train_s"] for s in seeds]
            ratios[f"lrft/{v}"] = {"wall_ratio_median": median(per_seed), "wall_ratio_per_seed":
                                   per_seed, "wall_ratio_iqr": iqr(per_seed),
                                   "train_ratio_median": median(per_seed_train),
                                   "train_ratio_per_seed": per_seed_train}
    print()
    print(table(rows))
    for k, r in ratios.items():
        print(f"{k}: wall time ratio {r['wall_ratio_median']:.3f} (per seed "
              f"{', '.join(f'{x:.3f}' for x in r['wall_ratio_per_seed'])}); train-loop ratio "
              f"{r['train_ratio_median']:.3f}")
    target = ratios.get("lrft/tuned", {}).get("wall_ratio_median")
    acc_ok = None
    if "lrft" in by and "tuned" in by:
        mean = {v: sum(by[v][s]["accuracy"] for s in seeds) / len(seeds) for v in ("lrft", "tuned")}
        acc_ok = mean["lrft"] >= mean["tuned"] - 0.01  # within one point of the tuned Trainer
    write_result("vs_trainer", {
        "complete": final, "seeds_compared": seeds,
        "config": {"rows": a.rows, "seeds": a.seeds, "threads": a.threads, "epochs": 1,
                   "device": a.device, "bf16": a.bf16,
                   "batch": 32, "lr": 5e-5, "eval_rows": 872, "model": "all-MiniLM-L6-v2"},
        "runs": runs, "summary": rows, "ratios": ratios,
        "target": {"lrft/tuned wall ratio <=": 0.90, "measured": target,
                   "pass": target is not None and target <= 0.90 and bool(acc_ok),
                   "accuracy_within_1pt": acc_ok}})


if __name__ == "__main__":
    main()
