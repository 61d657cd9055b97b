"""Which CPUs gain from bf16 autocast: MiniLM training step time, fp32 vs bf16, on this CPU.

`train.mixed_precision: auto` picks bf16 on a CPU that executes bf16 natively: AMX tiles (Intel
Sapphire Rapids and newer) or AVX512-BF16 (AMD Zen 4 EPYC, Intel Cooper Lake). This measures
whether that holds on the machine at hand: one MiniLM training step (forward, backward, clip,
fused AdamW) at batch 32 x 48 and 128 tokens, in fp32 and under bf16 autocast, with SDPA and with
eager attention, alternating settings so each ratio is measured at one load moment. Each run adds
(or replaces) this CPU's row in bench/results/cpu_bf16.json; the table in bench/README.md is
built from that file, one row per CPU it was run on.

Run:  python bench/cpu_bf16.py [--repeats 4 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

from _common import MINILM, RESULTS, cpu_info, loadavg, median, train_step

SETTINGS = {"fp32+sdpa": ("sdpa", False), "fp32+eager": ("eager", False),
            "bf16+sdpa": ("sdpa", True), "bf16+eager": ("eager", True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq_lens", type=int, nargs="+", default=[48, 128])
    a = p.parse_args()
    import torch
    from transformers import AutoModelForSequenceClassification

    from lrft.config import resolve_path

    torch.set_num_threads(a.threads)
    path = resolve_path(MINILM)
    models = {k: AutoModelForSequenceClassification.from_pretrained(path, num_labels=2,
                                                                    attn_implementation=attn)
              for k, (attn, _) in SETTINGS.items()}
    first = next(iter(models.values()))
    for m in models.values():
        m.load_state_dict(first.state_dict())
    opts = {k: torch.optim.AdamW(m.parameters(), lr=5e-5, fused=True) for k, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    cpu = cpu_info()
    row = {"cpu": cpu, "torch": torch.__version__, "threads": a.threads, "loadavg_start": loadavg()}
    for seq_len in a.seq_lens:
        batch = {"input_ids": torch.randint(1000, 20000, (32, seq_len), generator=gen),
                 "attention_mask": torch.ones(32, seq_len, dtype=torch.long),
                 "labels": torch.randint(0, 2, (32,), generator=gen)}

        def step(k, batch=batch):
            train_step(models[k], opts[k], batch, bf16=SETTINGS[k][1])

        times = {k: [] for k in SETTINGS}
        for k in SETTINGS:
            step(k)  # warm-up
        order = list(SETTINGS)
        for r in range(a.repeats):
            for k in order[r % len(order):] + order[:r % len(order)]:
                for _ in range(2):
                    t = time.perf_counter()
                    step(k)
                    times[k].append(time.perf_counter() - t)
        res = {k: median(v) for k, v in times.items()}
        res["bf16_speedup"] = res["fp32+sdpa"] / min(res["bf16+sdpa"], res["bf16+eager"])
        row[f"seq_{seq_len}"] = res
        print(f"{cpu['model']}: batch 32 x {seq_len}: " + ", ".join(
            f"{k} {res[k]:.2f}s" for k in SETTINGS) + f"; bf16 {res['bf16_speedup']:.2f}x",
            flush=True)
    row["loadavg_end"] = loadavg()
    row["time"] = time.strftime("%Y-%m-%d %H:%M")
    out = RESULTS / "cpu_bf16.json"
    table = json.loads(out.read_text()) if out.exists() else {}
    key = f"{cpu['model']} (amx={cpu['amx_tile']}, avx512_bf16={cpu['avx512_bf16']})"
    table[key] = row
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
